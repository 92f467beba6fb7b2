//! The gRPC face: `qvirt.v1.HookExecutor` over the discovery cache and the
//! runner.
//!
//! The discovery cache follows libvirt: a driver with no hook at the last
//! discovery (start, ReloadHooks, SIGHUP, or a daemon `reload`/`shutdown`
//! RunHook) runs nothing; for a driver that had one, every call scans its
//! scripts again, so edits inside an active driver apply at once.
//! Rediscoveries are serialised (scan and store under one lock), so the
//! cache always holds the last scan, never an older one stored late.
//!
//! A RunHook call is bounded by its gRPC deadline (`grpc-timeout`): it
//! waits for a run slot until then, and its scripts are killed shortly
//! before it (see [`call_deadline`]). Its response is kept under
//! [`REPLY_BUDGET`] (see [`fit_reply`]).

use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use prost::Message;
use prost_types::Timestamp;
use qvirt_common::internal_auth::InternalAuth;
use qvirt_proto::v1::hook_executor_server::HookExecutor;
use qvirt_proto::v1::hook_script_result::Termination as PbTermination;
use qvirt_proto::v1::{
    HookDriver, HookDriverInfo, HookOutcome, HookScriptResult, ListHooksRequest, ListHooksResponse,
    ReloadHooksRequest, ReloadHooksResponse, RunHookRequest, RunHookResponse,
};
use tokio::sync::{Mutex, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic::metadata::MetadataMap;
use tonic::{Request, Response, Status};
use tracing::Instrument;

use crate::config::Config;
use crate::discovery::{Discovery, Driver, DriverHooks, scan_driver};
use crate::exec::{Termination, hook_env};
use crate::run::{HookCall, RequestError, RunSettings, run_hooks, script_succeeded};
use crate::status::{self, HookError};

/// The `qvirt.v1.HookExecutor` service. Cheap to clone (shared state).
#[derive(Debug, Clone)]
pub struct HookExecutorService {
    inner: Arc<Inner>,
    /// Who may call: every method is internal.
    auth: InternalAuth,
}

#[derive(Debug)]
struct Inner {
    config: Config,
    settings: RunSettings,
    discovery: RwLock<Arc<Discovery>>,
    /// Held for a whole rediscovery (scan and store), so two concurrent
    /// ones cannot cache the older result.
    rediscovering: Mutex<()>,
    /// Fires on executor shutdown: running scripts are killed.
    shutdown: CancellationToken,
    /// One permit per RunHook call in progress.
    runs: Arc<Semaphore>,
}

impl HookExecutorService {
    /// A service for `config`, with a first discovery already made. Hooks
    /// get `LC_ALL=C` plus this process's PATH, HOME, USER, LOGNAME,
    /// TMPDIR and LD_* variables.
    pub async fn new(config: Config, shutdown: CancellationToken) -> Result<Self, HookError> {
        let settings = RunSettings {
            env: hook_env(|k| std::env::var_os(k)),
            max_output: config.max_output_bytes,
        };
        let first = scan(config.hooks_dir.clone()).await?;
        log_discovery(&config, &first);
        Ok(HookExecutorService {
            inner: Arc::new(Inner {
                runs: Arc::new(Semaphore::new(config.max_concurrent_runs)),
                config,
                settings,
                discovery: RwLock::new(Arc::new(first)),
                rediscovering: Mutex::new(()),
                shutdown,
            }),
            auth: InternalAuth::new(None, &[]),
        })
    }

    /// Who may call the executor: `auth`'s internal callers (every method
    /// acts on or reveals the operator's hooks). The default accepts only
    /// unix-socket peers running as root or as the executor's own user.
    pub fn with_internal_auth(mut self, auth: InternalAuth) -> Self {
        self.auth = auth;
        self
    }

    /// Discovers the hooks again (ReloadHooks, SIGHUP) and returns the
    /// result, now cached.
    pub async fn reload(&self) -> Result<Arc<Discovery>, HookError> {
        self.inner.rediscover().await
    }
}

impl Inner {
    fn cached(&self) -> Arc<Discovery> {
        match self.discovery.read() {
            Ok(d) => d.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    async fn rediscover(&self) -> Result<Arc<Discovery>, HookError> {
        let _one_at_a_time = self.rediscovering.lock().await;
        let found = Arc::new(scan(self.config.hooks_dir.clone()).await?);
        log_discovery(&self.config, &found);
        match self.discovery.write() {
            Ok(mut d) => *d = found.clone(),
            Err(poisoned) => *poisoned.into_inner() = found.clone(),
        }
        Ok(found)
    }

    async fn run(
        &self,
        call: HookCall,
        deadline: Option<Instant>,
    ) -> Result<RunHookResponse, HookError> {
        let cached = if call.rediscovers() {
            self.rediscover().await?
        } else {
            self.cached()
        };
        let active = cached.driver(call.driver).is_some_and(DriverHooks::active);
        if !active {
            return Ok(no_hooks());
        }
        // Active at discovery: look at what is there now.
        let dir = self.config.hooks_dir.clone();
        let driver = call.driver;
        let now = tokio::task::spawn_blocking(move || scan_driver(&dir, driver))
            .await
            .map_err(HookError::Task)?;
        if now.scripts.is_empty() && now.dir_error.is_none() {
            return Ok(no_hooks());
        }
        let run = run_hooks(
            &call,
            &now.scripts,
            &self.settings,
            &self.shutdown,
            deadline,
        )
        .await;
        if run.interrupted {
            return Err(HookError::ShuttingDown {
                ran: run.scripts.len(),
                total: now.scripts.len(),
            });
        }
        if run.deadline_exceeded {
            return Err(HookError::DeadlineExceeded {
                ran: run.scripts.len(),
                total: now.scripts.len(),
            });
        }
        // libvirt runs the main script, then fails to open DRIVER.d: that
        // error is the call's, whatever the main script did.
        if let Some(e) = &now.dir_error {
            tracing::warn!(driver = driver.name(), error = %e, "hook call failed");
        }
        let error = now.dir_error.or(run.error);
        let failed = error.is_some();
        tracing::debug!(
            driver = driver.name(),
            args = ?call.args,
            scripts = run.scripts.len(),
            failed,
            "hooks ran"
        );
        let filter = call.is_filter();
        let mut response = RunHookResponse {
            outcome: if failed {
                HookOutcome::Failed
            } else {
                HookOutcome::Success
            } as i32,
            results: run
                .scripts
                .iter()
                .map(|r| HookScriptResult {
                    path: r.path.to_string_lossy().into_owned(),
                    termination: match r.termination {
                        Termination::Exited(n) => Some(PbTermination::ExitCode(n)),
                        Termination::Signaled(n) => Some(PbTermination::Signal(n)),
                        Termination::Unknown => None,
                    },
                    // A filter's document is returned once, in `output`.
                    stdout: if filter {
                        Vec::new()
                    } else {
                        r.stdout.bytes.clone()
                    },
                    stdout_truncated: r.stdout.truncated,
                    stderr: r.stderr.bytes.clone(),
                    stderr_truncated: r.stderr.truncated,
                    duration: prost_types::Duration::try_from(r.duration).ok(),
                    timed_out: r.timed_out,
                    success: script_succeeded(&call, r),
                })
                .collect(),
            error: cut_error(error.unwrap_or_default()),
            output: run.output,
        };
        fit_reply(&mut response);
        Ok(response)
    }
}

/// The most a RunHook response holds of script output (all scripts'
/// stdout and stderr together), and about the most it holds in all: under
/// gRPC's default 4 MiB message limit.
pub const REPLY_BUDGET: usize = 3 << 20;
/// The longest `error` text; a longer one is cut, ending in [`CUT_MARK`].
pub const ERROR_MAX: usize = 64 << 10;
/// Ends an `error` text that was cut.
pub const CUT_MARK: &str = "... [cut]";

/// `error` cut to [`ERROR_MAX`] bytes (on a character boundary).
fn cut_error(mut error: String) -> String {
    if error.len() <= ERROR_MAX {
        return error;
    }
    let mut end = ERROR_MAX - CUT_MARK.len();
    while !error.is_char_boundary(end) {
        end -= 1;
    }
    error.truncate(end);
    error.push_str(CUT_MARK);
    error
}

/// Keeps `response` near [`REPLY_BUDGET`]: when the captured stdout and
/// stderr of all scripts together do not fit in what the rest of the
/// response leaves of it, the longest captures are cut to one equal share
/// (the largest share that fits), marked `*_truncated`. stderr keeps its
/// start (where the error is), a stdout tail keeps its end.
pub fn fit_reply(response: &mut RunHookResponse) {
    let captured: usize = response
        .results
        .iter()
        .map(|r| r.stdout.len() + r.stderr.len())
        .sum();
    // Room for the `*_truncated` flags that cutting may set (2 bytes each).
    let flags = 4 * response.results.len();
    let rest = response.encoded_len().saturating_sub(captured) + flags;
    let budget = REPLY_BUDGET.saturating_sub(rest);
    if captured <= budget {
        return;
    }
    let mut lens: Vec<usize> = response
        .results
        .iter()
        .flat_map(|r| [r.stdout.len(), r.stderr.len()])
        .collect();
    lens.sort_unstable();
    // The largest share such that every capture cut to it fits.
    let (mut left, mut n, mut share) = (budget, lens.len(), 0);
    for len in lens {
        let fair = left / n;
        if len > fair {
            share = fair;
            break;
        }
        left -= len;
        n -= 1;
    }
    for r in &mut response.results {
        if r.stdout.len() > share {
            let extra = r.stdout.len() - share;
            r.stdout.drain(..extra);
            r.stdout_truncated = true;
        }
        if r.stderr.len() > share {
            r.stderr.truncate(share);
            r.stderr_truncated = true;
        }
    }
}

/// The longest the executor's budget ends before the caller's deadline:
/// its answer (after killing what runs) then reaches the caller before the
/// caller, or tonic's own deadline handling, gives up.
const DEADLINE_MARGIN: Duration = Duration::from_millis(250);

/// The call's gRPC deadline (`grpc-timeout`, counted from `received`),
/// less a margin of a tenth of the timeout, at most [`DEADLINE_MARGIN`].
/// `None` without a (valid) header.
pub fn call_deadline(metadata: &MetadataMap, received: Instant) -> Option<Instant> {
    let timeout = grpc_timeout(metadata)?;
    Some(received + qvirt_common::rpc::within_deadline(timeout, DEADLINE_MARGIN))
}

/// The call's `grpc-timeout`, if valid.
fn grpc_timeout(metadata: &MetadataMap) -> Option<Duration> {
    qvirt_common::rpc::parse_grpc_timeout(metadata.get("grpc-timeout")?.to_str().ok()?)
}

/// Sleeps until `deadline`; forever without one.
async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

fn no_hooks() -> RunHookResponse {
    RunHookResponse {
        outcome: HookOutcome::NoHooks as i32,
        ..Default::default()
    }
}

async fn scan(dir: PathBuf) -> Result<Discovery, HookError> {
    tokio::task::spawn_blocking(move || Discovery::scan(&dir))
        .await
        .map_err(HookError::Task)
}

fn log_discovery(config: &Config, found: &Discovery) {
    if !found.dir_exists {
        tracing::info!(hooks_dir = %config.hooks_dir.display(), "hooks directory absent: no hooks");
    }
    for d in &found.drivers {
        for s in &d.skipped {
            tracing::warn!(driver = d.driver.name(), path = %s.display(), "skipped: not an executable regular file, or an unreadable DRIVER.d");
        }
        if d.active() {
            tracing::info!(
                driver = d.driver.name(),
                scripts = d.scripts.len(),
                "hooks found"
            );
        }
    }
}

fn driver_info(d: &DriverHooks) -> HookDriverInfo {
    let paths = |v: &[PathBuf]| v.iter().map(|p| p.to_string_lossy().into_owned()).collect();
    HookDriverInfo {
        driver: d.driver.proto() as i32,
        active: d.active(),
        scripts: paths(&d.scripts),
        skipped: paths(&d.skipped),
    }
}

fn timestamp(d: &Discovery) -> Timestamp {
    Timestamp::from(d.at)
}

#[tonic::async_trait]
impl HookExecutor for HookExecutorService {
    async fn run_hook(
        &self,
        request: Request<RunHookRequest>,
    ) -> Result<Response<RunHookResponse>, Status> {
        // Before the request is looked at or a slot is taken.
        self.auth.check(&request, "RunHook")?;
        let deadline = call_deadline(request.metadata(), Instant::now());
        let call = HookCall::from_request(
            request.into_inner(),
            self.inner.config.timeout(),
            self.inner.config.max_timeout(),
        )
        .map_err(status::request)?;
        // The hook's object names a domain for these drivers: it goes in
        // the ErrorInfo of a failed call.
        let domain = match call.driver {
            Driver::Qemu | Driver::Lxc | Driver::Libxl if call.args[0] != "-" => {
                call.args[0].clone()
            }
            _ => String::new(),
        };
        // Over max_concurrent_runs: wait for a slot (libvirt always runs
        // stopped and release hooks), until the deadline.
        let busy = || {
            status::executor(
                HookError::Busy(self.inner.config.max_concurrent_runs),
                &domain,
            )
        };
        let permit = tokio::select! {
            p = self.inner.runs.clone().acquire_owned() => p.map_err(|_| busy())?,
            () = sleep_until(deadline) => return Err(busy()),
            () = self.inner.shutdown.cancelled() => {
                return Err(status::executor(HookError::Stopping, &domain));
            }
        };
        let span = tracing::info_span!(
            "RunHook",
            driver = call.driver.name(),
            object = %call.args[0],
            op = %call.args[1],
        );
        // Own task: a caller that goes away before its deadline does not
        // abandon scripts half-run (each is bounded by its timeout, all by
        // the deadline).
        let inner = self.inner.clone();
        let response = tokio::spawn(
            async move {
                let _permit = permit;
                inner.run(call, deadline).await
            }
            .instrument(span),
        )
        .await
        .map_err(|e| status::executor(HookError::Task(e), &domain))?
        .map_err(|e| status::executor(e, &domain))?;
        Ok(Response::new(response))
    }

    async fn list_hooks(
        &self,
        request: Request<ListHooksRequest>,
    ) -> Result<Response<ListHooksResponse>, Status> {
        self.auth.check(&request, "ListHooks")?;
        let req = request.into_inner();
        let only = match HookDriver::try_from(req.driver) {
            Ok(d) => Driver::from_proto(d),
            Err(_) => return Err(status::request(RequestError::UnknownDriver(req.driver))),
        };
        let found = self.inner.cached();
        Ok(Response::new(ListHooksResponse {
            hooks_dir: self.inner.config.hooks_dir.to_string_lossy().into_owned(),
            discovered_at: Some(timestamp(&found)),
            drivers: found
                .drivers
                .iter()
                .filter(|d| only.is_none_or(|o| o == d.driver))
                .map(driver_info)
                .collect(),
        }))
    }

    async fn reload_hooks(
        &self,
        request: Request<ReloadHooksRequest>,
    ) -> Result<Response<ReloadHooksResponse>, Status> {
        self.auth.check(&request, "ReloadHooks")?;
        let found = self.reload().await.map_err(|e| status::executor(e, ""))?;
        Ok(Response::new(ReloadHooksResponse {
            hooks_dir: self.inner.config.hooks_dir.to_string_lossy().into_owned(),
            discovered_at: Some(timestamp(&found)),
            drivers: found.drivers.iter().map(driver_info).collect(),
        }))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn result(stdout: usize, stderr: usize) -> HookScriptResult {
        HookScriptResult {
            path: "/h/qemu.d/x".into(),
            stdout: vec![b'o'; stdout],
            stderr: vec![b'e'; stderr],
            ..Default::default()
        }
    }

    #[test]
    fn test_small_replies_are_left_alone() {
        let mut r = RunHookResponse {
            results: vec![result(4096, 300 << 10); 9],
            ..Default::default()
        };
        let before = r.clone();
        fit_reply(&mut r);
        assert_eq!(r, before);
    }

    /// Too much output: the longest captures are cut to one share, short
    /// ones kept, and the whole fits the budget.
    #[test]
    fn test_large_replies_are_cut_to_the_budget() {
        let mut results = vec![result(4096, 1 << 20); 8];
        results.push(result(10, 20));
        results[0].stdout[4095] = b'!';
        results[0].stderr[0] = b'#';
        let mut r = RunHookResponse {
            results,
            output: vec![b'd'; 100],
            ..Default::default()
        };
        fit_reply(&mut r);
        assert!(r.encoded_len() <= REPLY_BUDGET, "{}", r.encoded_len());
        assert!(r.encoded_len() > REPLY_BUDGET - 1024, "{}", r.encoded_len());
        let last = &r.results[8];
        assert_eq!((last.stdout.len(), last.stderr.len()), (10, 20));
        assert!(!last.stdout_truncated && !last.stderr_truncated);
        let first = &r.results[0];
        // stdout is a tail (keeps its end), stderr keeps its start.
        assert_eq!(first.stdout.last(), Some(&b'!'));
        assert_eq!(first.stderr.first(), Some(&b'#'));
        assert!(first.stderr_truncated && first.stderr.len() < 1 << 20);
        assert_eq!(r.output.len(), 100);
    }

    #[test]
    fn test_long_errors_are_cut_on_a_char_boundary() {
        assert_eq!(cut_error("short".into()), "short");
        let long = "é".repeat(ERROR_MAX);
        let cut = cut_error(long);
        assert!(cut.len() <= ERROR_MAX && cut.ends_with(CUT_MARK));
    }

    #[test]
    fn test_grpc_timeout_header() {
        let parse = |v: &str| {
            let mut m = MetadataMap::new();
            m.insert("grpc-timeout", v.parse().unwrap());
            grpc_timeout(&m)
        };
        assert_eq!(parse("2S"), Some(Duration::from_secs(2)));
        assert_eq!(parse("300000m"), Some(Duration::from_secs(300)));
        assert_eq!(parse("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse("5u"), Some(Duration::from_micros(5)));
        for bad in ["", "S", "2", "2x", "123456789S", "-1S"] {
            assert_eq!(parse(bad), None, "{bad}");
        }
        assert_eq!(grpc_timeout(&MetadataMap::new()), None);
        let mut m = MetadataMap::new();
        m.insert("grpc-timeout", "10S".parse().unwrap());
        let now = Instant::now();
        assert_eq!(
            call_deadline(&m, now),
            Some(now + Duration::from_secs(10) - DEADLINE_MARGIN)
        );
        m.insert("grpc-timeout", "1S".parse().unwrap());
        assert_eq!(
            call_deadline(&m, now),
            Some(now + Duration::from_millis(900))
        );
    }
}
