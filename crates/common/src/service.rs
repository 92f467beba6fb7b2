//! The body of every service binary's `main`, so each `main.rs` is only its
//! flags: load and check the config (exit 2 with one line if bad), set up
//! logging, start a runtime, bind, run until SIGTERM/SIGINT (exit 1 with
//! one line if that fails). SIGHUP never ends a service.

use std::future::Future;
use std::process::ExitCode;

use tokio_util::sync::CancellationToken;

use crate::cli::ServiceConfig;
use crate::config::ConfigError;
use crate::error_chain;
use crate::serve::Listener;

/// Exit code for a bad command line or config.
pub const EXIT_USAGE: u8 = 2;
/// Exit code for a failure while running.
pub const EXIT_RUNTIME: u8 = 1;

/// How [`main_with`] runs a service beyond the defaults.
#[derive(Debug, Clone, Copy, Default)]
pub struct MainOptions {
    /// The service listens for SIGHUP itself and logs what it reloaded:
    /// the shared "config changes need a restart" line is not logged.
    pub reloads_on_hangup: bool,
    /// The main runtime runs on one thread whatever `worker_threads`
    /// says: the service serves its callers on threads of its own and
    /// uses the key for those.
    pub serves_on_own_threads: bool,
}

/// Runs a service: `bin` names the program in error lines, `config` is the
/// loaded and overridden config (not yet validated), `run` is the service's
/// library entry point.
pub fn main<C, F, Fut, E>(bin: &str, config: Result<C, ConfigError>, run: F) -> ExitCode
where
    C: ServiceConfig,
    F: FnOnce(C, Listener, CancellationToken) -> Fut,
    Fut: Future<Output = Result<(), E>>,
    E: std::error::Error + 'static,
{
    main_with(bin, config, MainOptions::default(), run)
}

/// As [`main`], with `options`.
pub fn main_with<C, F, Fut, E>(
    bin: &str,
    config: Result<C, ConfigError>,
    options: MainOptions,
    run: F,
) -> ExitCode
where
    C: ServiceConfig,
    F: FnOnce(C, Listener, CancellationToken) -> Fut,
    Fut: Future<Output = Result<(), E>>,
    E: std::error::Error + 'static,
{
    let config = match config.and_then(|c| c.validate().map(|()| c)) {
        Ok(c) => c,
        Err(e) => return fail(bin, &e, EXIT_USAGE),
    };
    crate::telemetry::init(config.log_format());
    let threads = if options.serves_on_own_threads {
        1
    } else {
        config.worker_threads()
    };
    let mut builder = match threads {
        1 => tokio::runtime::Builder::new_current_thread(),
        n => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            if n > 1 {
                b.worker_threads(n);
            }
            b
        }
    };
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => return fail(bin, &e, EXIT_RUNTIME),
    };
    runtime.block_on(async move {
        let shutdown = match crate::shutdown::on_signals() {
            Ok(t) => t,
            Err(e) => return fail(bin, &e, EXIT_RUNTIME),
        };
        if let Err(e) = crate::shutdown::on_hangup_with(!options.reloads_on_hangup) {
            return fail(bin, &e, EXIT_RUNTIME);
        }
        let listener = match Listener::bind(config.listen()).await {
            Ok(l) => l,
            Err(e) => return fail(bin, &e, EXIT_RUNTIME),
        };
        match run(config, listener, shutdown).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(bin, &e, EXIT_RUNTIME),
        }
    })
}

fn fail(bin: &str, err: &(dyn std::error::Error + 'static), code: u8) -> ExitCode {
    eprintln!("{bin}: {}", error_chain(err));
    ExitCode::from(code)
}
