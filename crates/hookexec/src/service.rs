//! The gRPC face: `qvirt.v1.HookExecutor` over the discovery cache and the
//! runner.
//!
//! The discovery cache follows libvirt: a driver with no hook at the last
//! discovery (start, ReloadHooks, SIGHUP, or a daemon `reload`/`shutdown`
//! RunHook) runs nothing; for a driver that had one, every call scans its
//! scripts again, so edits inside an active driver apply at once.

use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use prost_types::Timestamp;
use qvirt_proto::v1::hook_executor_server::HookExecutor;
use qvirt_proto::v1::hook_script_result::Termination as PbTermination;
use qvirt_proto::v1::{
    HookDriver, HookDriverInfo, HookOutcome, HookScriptResult, ListHooksRequest, ListHooksResponse,
    ReloadHooksRequest, ReloadHooksResponse, RunHookRequest, RunHookResponse,
};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
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
}

#[derive(Debug)]
struct Inner {
    config: Config,
    settings: RunSettings,
    discovery: RwLock<Arc<Discovery>>,
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
                shutdown,
            }),
        })
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
        let found = Arc::new(scan(self.config.hooks_dir.clone()).await?);
        log_discovery(&self.config, &found);
        match self.discovery.write() {
            Ok(mut d) => *d = found.clone(),
            Err(poisoned) => *poisoned.into_inner() = found.clone(),
        }
        Ok(found)
    }

    async fn run(&self, call: HookCall) -> Result<RunHookResponse, HookError> {
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
        if now.scripts.is_empty() {
            return Ok(no_hooks());
        }
        let run = run_hooks(&call, &now.scripts, &self.settings, &self.shutdown).await;
        if run.interrupted {
            return Err(HookError::ShuttingDown {
                ran: run.scripts.len(),
                total: now.scripts.len(),
            });
        }
        let failed = run.error.is_some();
        tracing::debug!(
            driver = driver.name(),
            args = ?call.args,
            scripts = run.scripts.len(),
            failed,
            "hooks ran"
        );
        Ok(RunHookResponse {
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
                    stdout: r.stdout.bytes.clone(),
                    stdout_truncated: r.stdout.truncated,
                    stderr: r.stderr.bytes.clone(),
                    stderr_truncated: r.stderr.truncated,
                    duration: prost_types::Duration::try_from(r.duration).ok(),
                    timed_out: r.timed_out,
                    success: script_succeeded(&call, r),
                })
                .collect(),
            error: run.error.unwrap_or_default(),
            output: run.output,
        })
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
            tracing::warn!(driver = d.driver.name(), path = %s.display(), "skipped: not an executable regular file");
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
        let call = HookCall::from_request(
            request.into_inner(),
            self.inner.config.timeout(),
            self.inner.config.max_timeout(),
        )
        .map_err(status::request)?;
        let permit = self.inner.runs.clone().try_acquire_owned().map_err(|_| {
            status::executor(HookError::Busy(self.inner.config.max_concurrent_runs))
        })?;
        let span = tracing::info_span!(
            "RunHook",
            driver = call.driver.name(),
            object = %call.args[0],
            op = %call.args[1],
        );
        // Own task: a caller that goes away does not abandon scripts
        // half-run (each is bounded by its timeout).
        let inner = self.inner.clone();
        let response = tokio::spawn(
            async move {
                let _permit = permit;
                inner.run(call).await
            }
            .instrument(span),
        )
        .await
        .map_err(|e| status::executor(HookError::Task(e)))?
        .map_err(status::executor)?;
        Ok(Response::new(response))
    }

    async fn list_hooks(
        &self,
        request: Request<ListHooksRequest>,
    ) -> Result<Response<ListHooksResponse>, Status> {
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
        _request: Request<ReloadHooksRequest>,
    ) -> Result<Response<ReloadHooksResponse>, Status> {
        let found = self.reload().await.map_err(status::executor)?;
        Ok(Response::new(ReloadHooksResponse {
            hooks_dir: self.inner.config.hooks_dir.to_string_lossy().into_owned(),
            discovered_at: Some(timestamp(&found)),
            drivers: found.drivers.iter().map(driver_info).collect(),
        }))
    }
}
