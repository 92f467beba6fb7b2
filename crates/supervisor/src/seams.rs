//! The seams where the event bus and the hook executor plug in. Without
//! them configured the supervisor runs with [`LogEvents`] (events go to the
//! log at debug level) and [`NoHooks`] (every hook succeeds at once); the
//! clients are `crate::publisher` and `crate::hooks`.
//!
//! - [`EventSink`]: called, in order, for every QMP event read from a
//!   domain's monitor and for every lifecycle change. It must not block
//!   (the watcher of a guest calls it): a bus publisher pushes into a
//!   bounded queue and counts what it drops.
//! - [`Hooks`]: called at libvirt's hook points (prepare, start, started,
//!   stopped, release, reconnect) and the daemon's start and shutdown. A
//!   failing prepare/start/started hook aborts the start, a failing
//!   reconnect hook destroys the guest; stopped/release failures are
//!   logged. The `restore` hook is a filter ([`Hooks::filter`]): its
//!   scripts may print the definition to restore with.

use std::future::Future;
use std::pin::Pin;

use qvirt_proto::v1::{
    DomainEventCrashedDetail, DomainEventDefinedDetail, DomainEventResumedDetail,
    DomainEventShutdownDetail, DomainEventStartedDetail, DomainEventStoppedDetail,
    DomainEventSuspendedDetail, DomainEventType, DomainEventUndefinedDetail, DomainSpec,
    DomainStateReason, domain_event,
};
use tracing::debug;

use crate::qmp::QmpEvent;

/// Which domain an event is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainRef {
    /// The domain's name.
    pub name: String,
    /// Its UUID.
    pub uuid: String,
    /// The supervisor's node name.
    pub host: String,
}

/// A typed lifecycle event: libvirt's event type with the detail that
/// belongs to it, as the proto's `DomainEvent.detail` oneof (a type can
/// only carry its own detail enum).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lifecycle {
    /// Defined, or its definition changed.
    Defined(DomainEventDefinedDetail),
    /// Its definition was removed.
    Undefined(DomainEventUndefinedDetail),
    /// QEMU was started.
    Started(DomainEventStartedDetail),
    /// The vCPUs were paused.
    Suspended(DomainEventSuspendedDetail),
    /// The vCPUs were resumed.
    Resumed(DomainEventResumedDetail),
    /// QEMU stopped.
    Stopped(DomainEventStoppedDetail),
    /// The guest finished shutting down.
    Shutdown(DomainEventShutdownDetail),
    /// The guest crashed.
    Crashed(DomainEventCrashedDetail),
}

impl Lifecycle {
    /// The event type.
    pub fn kind(self) -> DomainEventType {
        match self {
            Lifecycle::Defined(_) => DomainEventType::Defined,
            Lifecycle::Undefined(_) => DomainEventType::Undefined,
            Lifecycle::Started(_) => DomainEventType::Started,
            Lifecycle::Suspended(_) => DomainEventType::Suspended,
            Lifecycle::Resumed(_) => DomainEventType::Resumed,
            Lifecycle::Stopped(_) => DomainEventType::Stopped,
            Lifecycle::Shutdown(_) => DomainEventType::Shutdown,
            Lifecycle::Crashed(_) => DomainEventType::Crashed,
        }
    }

    /// The proto's `detail` oneof member.
    pub fn detail(self) -> domain_event::Detail {
        use domain_event::Detail;
        match self {
            Lifecycle::Defined(d) => Detail::Defined(d as i32),
            Lifecycle::Undefined(d) => Detail::Undefined(d as i32),
            Lifecycle::Started(d) => Detail::Started(d as i32),
            Lifecycle::Suspended(d) => Detail::Suspended(d as i32),
            Lifecycle::Resumed(d) => Detail::Resumed(d as i32),
            Lifecycle::Stopped(d) => Detail::Stopped(d as i32),
            Lifecycle::Shutdown(d) => Detail::Shutdown(d as i32),
            Lifecycle::Crashed(d) => Detail::Crashed(d as i32),
        }
    }
}

/// Where the supervisor's events go; see the module docs.
pub trait EventSink: Send + Sync + 'static {
    /// A raw QMP event from `domain`'s monitor.
    fn monitor_event(&self, domain: &DomainRef, event: &QmpEvent);
    /// A lifecycle change of `domain`.
    fn lifecycle(&self, domain: &DomainRef, event: Lifecycle);
}

/// The stand-in [`EventSink`] until the bus client exists: logs at debug.
#[derive(Debug, Default)]
pub struct LogEvents;

impl EventSink for LogEvents {
    fn monitor_event(&self, domain: &DomainRef, event: &QmpEvent) {
        debug!(domain = %domain.name, event = %event.name, data = %event.data, "monitor event");
    }

    fn lifecycle(&self, domain: &DomainRef, event: Lifecycle) {
        debug!(domain = %domain.name, event = ?event, "lifecycle event");
    }
}

/// libvirt's hook points for a domain (`qemu NAME OP SUBOP EXTRA`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HookOp {
    /// `prepare begin`, before anything is set up for a start.
    Prepare,
    /// `start begin`, right before QEMU is spawned.
    Start,
    /// `started begin`, QEMU runs (paused), before the vCPUs start.
    Started,
    /// `stopped end`, QEMU has exited.
    Stopped,
    /// `release end REASON`, the domain's resources are released; the
    /// extra argument is the shut-off reason in libvirt's words (libvirt
    /// 10.5 and later; before, `-`).
    Release(DomainStateReason),
    /// `reconnect begin`, a running QEMU was found after a restart.
    Reconnect,
    /// `restore begin`, a filter of the definition before a restore.
    Restore,
}

impl HookOp {
    /// The operation argument (`prepare`, ...).
    pub fn op(self) -> &'static str {
        match self {
            HookOp::Prepare => "prepare",
            HookOp::Start => "start",
            HookOp::Started => "started",
            HookOp::Stopped => "stopped",
            HookOp::Release(_) => "release",
            HookOp::Reconnect => "reconnect",
            HookOp::Restore => "restore",
        }
    }

    /// The sub-operation argument: `end` for stopped and release, else
    /// `begin`.
    pub fn sub_op(self) -> &'static str {
        match self {
            HookOp::Stopped | HookOp::Release(_) => "end",
            _ => "begin",
        }
    }

    /// The extra argument: the shut-off reason for `release`, else `-`.
    pub fn extra(self) -> &'static str {
        match self {
            HookOp::Release(reason) => release_reason(reason),
            _ => "-",
        }
    }
}

/// libvirt's name of a shut-off reason (`virDomainShutoffReason`), as its
/// `release` hook passes it: `unknown` for anything not a shut-off reason.
pub fn release_reason(reason: DomainStateReason) -> &'static str {
    match reason {
        DomainStateReason::ShutoffShutdown => "shutdown",
        DomainStateReason::ShutoffDestroyed => "destroyed",
        DomainStateReason::ShutoffCrashed => "crashed",
        DomainStateReason::ShutoffMigrated => "migrated",
        DomainStateReason::ShutoffSaved => "saved",
        DomainStateReason::ShutoffFailed => "failed",
        DomainStateReason::ShutoffFromSnapshot => "from snapshot",
        DomainStateReason::ShutoffDaemon => "daemon",
        _ => "unknown",
    }
}

impl std::fmt::Display for HookOp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.op(), self.sub_op())
    }
}

/// The daemon hook points (`daemon - OP SUBOP EXTRA`); their failures are
/// only logged, as libvirt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DaemonHookOp {
    /// `- start - start`: the supervisor starts.
    Start,
    /// `- shutdown - shutdown`: the supervisor stops (SIGTERM/SIGINT).
    Shutdown,
    /// `- reload begin SIGHUP`: the supervisor got SIGHUP (the executor
    /// discovers the hooks again before running it, as libvirt).
    Reload,
}

/// Why a hook did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum HookError {
    /// A script failed (non-zero exit, signal, timeout); `message` is the
    /// executor's libvirt-style text, with the script's stderr.
    #[error("{op} hook failed: {message}")]
    Failed {
        /// The hook point.
        op: HookOp,
        /// The executor's message.
        message: String,
    },
    /// The hook executor could not be asked (down, unreachable, or it
    /// answered with an error of its own): nothing is known to have run.
    #[error("{op} hook not run: hook executor unavailable: {message}")]
    Unavailable {
        /// The hook point.
        op: HookOp,
        /// What the client saw.
        message: String,
    },
    /// The scripts of a filter hook succeeded but printed something that
    /// is not a definition in the hooks' stdin format.
    #[error("{op} hook printed no valid definition: {message}")]
    BadOutput {
        /// The hook point.
        op: HookOp,
        /// What is wrong with it.
        message: String,
    },
}

impl HookError {
    /// The hook point.
    pub fn op(&self) -> HookOp {
        match self {
            HookError::Failed { op, .. }
            | HookError::Unavailable { op, .. }
            | HookError::BadOutput { op, .. } => *op,
        }
    }
}

/// A boxed hook future.
pub type HookFuture<'a> = Pin<Box<dyn Future<Output = Result<(), HookError>> + Send + 'a>>;

/// A boxed filter hook future: the definition the scripts printed, or
/// `None` when they printed nothing (keep the input).
pub type FilterFuture<'a> =
    Pin<Box<dyn Future<Output = Result<Option<DomainSpec>, HookError>> + Send + 'a>>;

/// Runs hooks; see the module docs.
pub trait Hooks: Send + Sync + 'static {
    /// Run hook `op` for `spec`.
    fn run<'a>(&'a self, spec: &'a DomainSpec, op: HookOp) -> HookFuture<'a>;

    /// Run the filter hook `op` (`restore begin`) over `spec`: the
    /// definition its scripts printed (not yet checked beyond parsing), or
    /// `None` to keep `spec`. Without scripts, `None`.
    fn filter<'a>(&'a self, spec: &'a DomainSpec, op: HookOp) -> FilterFuture<'a> {
        let _ = (spec, op);
        Box::pin(async { Ok(None) })
    }

    /// Run the daemon hook `op`; failures are logged by the implementation.
    fn daemon(&self, op: DaemonHookOp) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        let _ = op;
        Box::pin(async {})
    }
}

/// [`Hooks`] when no hook executor is configured: every hook succeeds at
/// once, nothing runs.
#[derive(Debug, Default)]
pub struct NoHooks;

impl Hooks for NoHooks {
    fn run<'a>(&'a self, _spec: &'a DomainSpec, _op: HookOp) -> HookFuture<'a> {
        Box::pin(async { Ok(()) })
    }
}

/// What to ask a guest's agent for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AgentPower {
    /// Shut down and power off.
    Powerdown,
    /// Reboot.
    Reboot,
}

/// The agent service's answer when it was not OK: its gRPC code (passed
/// on to the caller: UNAVAILABLE agent, DEADLINE_EXCEEDED, ...) and text.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{code:?}: {message}")]
pub struct AgentError {
    /// The code the agent service answered (or ours for a timeout).
    pub code: tonic::Code,
    /// Its message.
    pub message: String,
    /// The ErrorInfo reason it gave, if any (passed on to our caller).
    pub reason: Option<String>,
}

/// A boxed agent future.
pub type AgentFuture<'a> = Pin<Box<dyn Future<Output = Result<(), AgentError>> + Send + 'a>>;

/// Shutdown and reboot through a domain's guest agent (the agent service
/// client, `crate::agent`).
pub trait GuestPower: Send + Sync + 'static {
    /// Ask the agent of `domain` (name) for `op`.
    fn power<'a>(&'a self, domain: &'a str, op: AgentPower) -> AgentFuture<'a>;
}
