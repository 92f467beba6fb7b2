//! Graceful shutdown: one [`CancellationToken`] that fires on SIGTERM or
//! SIGINT. Services hand child tokens to their per-guest and per-stream
//! tasks so that everything stops together.
//!
//! SIGHUP never ends a service: [`on_hangup`] takes it over before the
//! service binds, and a service that reloads something on SIGHUP listens
//! for it itself (every tokio signal listener gets each signal).

use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;

/// Returns a token cancelled when the process receives SIGTERM or SIGINT.
/// Must be called inside a tokio runtime.
pub fn on_signals() -> std::io::Result<CancellationToken> {
    let token = CancellationToken::new();
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let fire = token.clone();
    tokio::spawn(async move {
        let name = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
            () = fire.cancelled() => return,
        };
        tracing::info!(signal = name, "shutting down");
        fire.cancel();
    });
    Ok(token)
}

/// Takes SIGHUP over from its default action (which ends the process) and
/// logs each one. What a service reloads, it does from its own listener
/// (the hook executor discovers its hooks again, the supervisor runs the
/// daemon `reload` hook and reads some settings again, the gateway
/// reloads its tokens); the other services only log it. Must be called
/// inside a tokio runtime, before the service can be signalled.
pub fn on_hangup() -> std::io::Result<()> {
    on_hangup_with(true)
}

/// As [`on_hangup`]; with `log` false nothing is logged, for a service
/// whose own listener says precisely what it reloaded and what not.
pub fn on_hangup_with(log: bool) -> std::io::Result<()> {
    let mut hup = signal(SignalKind::hangup())?;
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            if log {
                tracing::info!(signal = "SIGHUP", "received");
            }
        }
    });
    Ok(())
}
