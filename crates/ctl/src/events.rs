//! Events: `event` (lifecycle events, EventBus.SubscribeDomainEvents) and
//! `qemu-monitor-event` (raw QMP events, SubscribeMonitorEvents), printed
//! as virsh prints them: one event and done, or `--loop` until Ctrl-C or
//! `--timeout`, then `events received: N`.

use std::time::Duration;

use qvirt_proto::v1::{
    DomainEvent, DomainEventType, EventsLost, HostEvent, HostEventType, MonitorEvent,
    MonitorEventFilterFlag, SubscribeDomainEventsRequest, SubscribeMonitorEventsRequest,
    domain_event, subscribe_domain_events_response, subscribe_monitor_events_response,
};

use crate::CtlError;
use crate::conn::{Gateway, Global};
use crate::output::{self, out_line};

/// The event types `event --event` knows (virsh's names).
pub const EVENT_TYPES: [&str; 1] = ["lifecycle"];

/// `event`.
#[derive(Debug, clap::Args)]
pub struct EventArgs {
    /// Only events of this domain (name or UUID).
    #[arg(long)]
    pub domain: Option<String>,
    /// The event type: lifecycle (the one qvirt has).
    #[arg(long, value_name = "EVENT")]
    pub event: Option<String>,
    /// Every event type (lifecycle).
    #[arg(long)]
    pub all: bool,
    /// Keep waiting for events until Ctrl-C (or --timeout).
    #[arg(long = "loop")]
    pub loop_: bool,
    /// Stop after SECONDS.
    #[arg(long, value_name = "SECONDS")]
    pub timeout: Option<u64>,
    /// List the event types and exit.
    #[arg(long)]
    pub list: bool,
    /// Prefix each event with the time it was received.
    #[arg(long)]
    pub timestamp: bool,
}

/// `qemu-monitor-event`.
#[derive(Debug, clap::Args)]
pub struct MonitorEventArgs {
    /// Only events of this domain (name or UUID).
    #[arg(long)]
    pub domain: Option<String>,
    /// Only events with this name (or matching it, with --regex).
    #[arg(long, value_name = "NAME")]
    pub event: Option<String>,
    /// Pretty-print the event's details.
    #[arg(long)]
    pub pretty: bool,
    /// Keep waiting for events until Ctrl-C (or --timeout).
    #[arg(long = "loop")]
    pub loop_: bool,
    /// Stop after SECONDS.
    #[arg(long, value_name = "SECONDS")]
    pub timeout: Option<u64>,
    /// --event is a regular expression (matched anywhere in the name).
    #[arg(long)]
    pub regex: bool,
    /// --event matches case-insensitively.
    #[arg(long)]
    pub no_case: bool,
    /// Print the time each event was received instead of QEMU's.
    #[arg(long)]
    pub timestamp: bool,
}

/// How a wait for events ended.
enum End {
    Done,
    Timeout,
    Interrupted,
}

/// Receives messages from `next` until `handle` says it has seen enough,
/// Ctrl-C, or `timeout`.
async fn pump<T, F, H>(mut next: F, timeout: Option<u64>, mut handle: H) -> Result<End, CtlError>
where
    F: AsyncFnMut() -> Result<Option<T>, tonic::Status>,
    H: FnMut(T) -> Result<bool, CtlError>,
{
    let deadline = timeout.map(|s| tokio::time::Instant::now() + Duration::from_secs(s));
    let sleep = async {
        match deadline {
            Some(d) => tokio::time::sleep_until(d).await,
            None => std::future::pending().await,
        }
    };
    let mut sleep = std::pin::pin!(sleep);
    let mut ctrl_c = std::pin::pin!(tokio::signal::ctrl_c());
    loop {
        tokio::select! {
            msg = next() => match msg? {
                Some(m) => if handle(m)? { return Ok(End::Done) },
                None => return Err(CtlError::Failed("the gateway ended the event stream".into())),
            },
            () = &mut sleep => return Ok(End::Timeout),
            _ = &mut ctrl_c => return Ok(End::Interrupted),
        }
    }
}

fn finish(g: &Global, end: End, count: u64) -> Result<u8, CtlError> {
    if g.json {
        return Ok(0);
    }
    match end {
        End::Done => {}
        End::Timeout => out_line("event loop timed out")?,
        End::Interrupted => out_line("event loop interrupted")?,
    }
    out_line(&format!("events received: {count}"))?;
    Ok(0)
}

fn lost(l: &EventsLost) {
    eprintln!(
        "warning: {} event(s) lost ({})",
        l.count,
        l.reason().as_str_name()
    );
}

/// `event`.
pub async fn event(gw: &Gateway, g: &Global, a: EventArgs) -> Result<u8, CtlError> {
    if a.list {
        if g.json {
            return output::print_json(&serde_json::json!(EVENT_TYPES)).map(|()| 0);
        }
        for t in EVENT_TYPES {
            out_line(t)?;
        }
        return Ok(0);
    }
    match a.event.as_deref() {
        None if a.all => {}
        None => {
            return Err(CtlError::Usage(
                "one of --event lifecycle or --all is required (as in virsh)".into(),
            ));
        }
        Some(e) if EVENT_TYPES.contains(&e) => {}
        Some(e) => {
            return Err(CtlError::Usage(format!(
                "unknown event type {e:?}: try --list"
            )));
        }
    }
    let mut stream = gw
        .events()
        .subscribe_domain_events(SubscribeDomainEventsRequest {
            domain: a.domain.clone().unwrap_or_default(),
            ..Default::default()
        })
        .await?
        .into_inner();
    let mut count = 0u64;
    let end = pump(
        async || stream.message().await,
        a.timeout,
        |msg: qvirt_proto::v1::SubscribeDomainEventsResponse| {
            use subscribe_domain_events_response::Kind;
            match msg.kind {
                Some(Kind::Event(e)) => {
                    count += 1;
                    if g.json {
                        output::print_json_line(&output::to_json("qvirt.v1.DomainEvent", &e)?)?;
                    } else {
                        let line = lifecycle_line(&e);
                        if a.timestamp {
                            out_line(&format!("{}: {line}", output::now()))?;
                        } else {
                            out_line(&line)?;
                        }
                    }
                    Ok(!a.loop_)
                }
                Some(Kind::Lost(l)) => {
                    lost(&l);
                    Ok(false)
                }
                // A fleet host's liveness: printed, but not the lifecycle
                // event asked for, so it neither counts nor ends the wait.
                Some(Kind::HostEvent(h)) => {
                    if g.json {
                        output::print_json_line(&output::to_json("qvirt.v1.HostEvent", &h)?)?;
                    } else {
                        let line = host_line(&h);
                        if a.timestamp {
                            out_line(&format!("{}: {line}", output::now()))?;
                        } else {
                            out_line(&line)?;
                        }
                    }
                    Ok(false)
                }
                Some(Kind::Established(_)) | None => Ok(false),
            }
        },
    )
    .await?;
    finish(g, end, count)
}

/// A virsh-like line for a fleet host event:
/// `event 'host' for host 'node-a': Unreachable`.
pub fn host_line(e: &HostEvent) -> String {
    let what = match HostEventType::try_from(e.r#type) {
        Ok(HostEventType::Unreachable) => "Unreachable",
        Ok(HostEventType::Reachable) => "Reachable",
        _ => "Unknown",
    };
    format!("event 'host' for host '{}': {what}", e.host)
}

/// virsh's line for a lifecycle event:
/// `event 'lifecycle' for domain 'demo': Started Booted`.
pub fn lifecycle_line(e: &DomainEvent) -> String {
    let (kind, detail) = lifecycle_words(e);
    format!(
        "event 'lifecycle' for domain '{}': {kind} {detail}",
        e.domain_name
    )
}

/// virsh's words for an event's type and detail
/// (`virshDomainEventToString`, `virshDomainEventDetailToString`).
fn lifecycle_words(e: &DomainEvent) -> (&'static str, &'static str) {
    use domain_event::Detail;
    let pick = |v: i32, names: &[&'static str]| {
        usize::try_from(v)
            .ok()
            .and_then(|i| i.checked_sub(1))
            .and_then(|i| names.get(i).copied())
            .unwrap_or("unknown")
    };
    let kind = match e.r#type() {
        DomainEventType::Unspecified => "Unknown",
        DomainEventType::Defined => "Defined",
        DomainEventType::Undefined => "Undefined",
        DomainEventType::Started => "Started",
        DomainEventType::Suspended => "Suspended",
        DomainEventType::Resumed => "Resumed",
        DomainEventType::Stopped => "Stopped",
        DomainEventType::Shutdown => "Shutdown",
        DomainEventType::Pmsuspended => "PMSuspended",
        DomainEventType::Crashed => "Crashed",
    };
    let detail = match e.detail {
        Some(Detail::Defined(v)) => pick(v, &["Added", "Updated", "Renamed", "Snapshot"]),
        Some(Detail::Undefined(v)) => pick(v, &["Removed", "Renamed"]),
        Some(Detail::Started(v)) => pick(
            v,
            &[
                "Booted",
                "Migrated",
                "Restored",
                "Snapshot",
                "Event wakeup",
                "Recreated",
            ],
        ),
        Some(Detail::Suspended(v)) => pick(
            v,
            &[
                "Paused",
                "Migrated",
                "I/O Error",
                "Watchdog",
                "Restored",
                "Snapshot",
                "API error",
                "Post-copy",
                "Post-copy Error",
            ],
        ),
        Some(Detail::Resumed(v)) => pick(
            v,
            &[
                "Unpaused",
                "Migrated",
                "Snapshot",
                "Post-copy",
                "Post-copy Error",
            ],
        ),
        Some(Detail::Stopped(v)) => pick(
            v,
            &[
                "Shutdown",
                "Destroyed",
                "Crashed",
                "Migrated",
                "Saved",
                "Failed",
                "Snapshot",
            ],
        ),
        Some(Detail::Shutdown(v)) => pick(
            v,
            &[
                "Finished",
                "Finished after guest request",
                "Finished after host request",
            ],
        ),
        Some(Detail::Pmsuspended(v)) => pick(v, &["Memory", "Disk"]),
        Some(Detail::Crashed(v)) => pick(v, &["Panicked", "Crashloaded"]),
        None => "unknown",
    };
    (kind, detail)
}

/// `qemu-monitor-event`.
pub async fn monitor_event(gw: &Gateway, g: &Global, a: MonitorEventArgs) -> Result<u8, CtlError> {
    let mut flags = Vec::new();
    if a.regex {
        flags.push(MonitorEventFilterFlag::Regex as i32);
    }
    if a.no_case {
        flags.push(MonitorEventFilterFlag::Nocase as i32);
    }
    let mut stream = gw
        .events()
        .subscribe_monitor_events(SubscribeMonitorEventsRequest {
            domain: a.domain.clone().unwrap_or_default(),
            event: a.event.clone().unwrap_or_default(),
            flags,
            ..Default::default()
        })
        .await?
        .into_inner();
    let mut count = 0u64;
    let end = pump(
        async || stream.message().await,
        a.timeout,
        |msg: qvirt_proto::v1::SubscribeMonitorEventsResponse| {
            use subscribe_monitor_events_response::Kind;
            match msg.kind {
                Some(Kind::Event(e)) => {
                    count += 1;
                    if g.json {
                        let mut v = output::to_json("qvirt.v1.MonitorEvent", &e)?;
                        // The details as JSON, not as a string of JSON.
                        if let Ok(details) =
                            serde_json::from_str::<serde_json::Value>(&e.details_json)
                        {
                            v["details"] = details;
                        }
                        output::print_json_line(&v)?;
                    } else {
                        out_line(&monitor_line(&e, a.pretty, a.timestamp.then(output::now)))?;
                    }
                    Ok(!a.loop_)
                }
                Some(Kind::Lost(l)) => {
                    lost(&l);
                    Ok(false)
                }
                Some(Kind::Established(_)) | None => Ok(false),
            }
        },
    )
    .await?;
    finish(g, end, count)
}

/// virsh's line for a QMP event:
/// `event STOP at 1765081234.123456 for domain 'demo': {}`, or with a
/// receive time, `TIME: event STOP for domain 'demo': {}`.
pub fn monitor_line(e: &MonitorEvent, pretty: bool, received: Option<String>) -> String {
    let details = if pretty {
        serde_json::from_str::<serde_json::Value>(&e.details_json)
            .ok()
            .and_then(|v| serde_json::to_string_pretty(&v).ok())
            .unwrap_or_else(|| e.details_json.clone())
    } else {
        e.details_json.clone()
    };
    match received {
        Some(time) => format!(
            "{time}: event {} for domain '{}': {details}",
            e.event, e.domain_name
        ),
        None => format!(
            "event {} at {}.{:06} for domain '{}': {details}",
            e.event, e.timestamp_seconds, e.timestamp_microseconds, e.domain_name
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use qvirt_proto::v1::DomainEventStartedDetail;

    #[test]
    fn test_lines_are_virsh_lines() {
        let e = DomainEvent {
            domain_name: "demo".into(),
            r#type: DomainEventType::Started as i32,
            detail: Some(domain_event::Detail::Started(
                DomainEventStartedDetail::Booted as i32,
            )),
            ..Default::default()
        };
        assert_eq!(
            lifecycle_line(&e),
            "event 'lifecycle' for domain 'demo': Started Booted"
        );
        let m = MonitorEvent {
            domain_name: "demo".into(),
            event: "STOP".into(),
            timestamp_seconds: 17,
            timestamp_microseconds: 42,
            details_json: "{}".into(),
            ..Default::default()
        };
        assert_eq!(
            monitor_line(&m, false, None),
            "event STOP at 17.000042 for domain 'demo': {}"
        );
        let h = HostEvent {
            host: "node-a".into(),
            r#type: HostEventType::Unreachable as i32,
            time: None,
        };
        assert_eq!(host_line(&h), "event 'host' for host 'node-a': Unreachable");
    }
}
