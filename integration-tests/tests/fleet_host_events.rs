//! Host events from the fleet registry: two gateway-side `qvirt-eventbus`
//! (`fleet:`) watch the registry, and when a host's heartbeat expires or
//! comes back each publishes a HostEvent into the stream under the same
//! message id, so it is stored once: a domain-event subscriber on either
//! bus gets exactly one UNREACHABLE, then one REACHABLE. Real
//! nats-server, real buses; the host is a HostRecord put by hand with a
//! short TTL.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use async_nats::jetstream::{self, stream};
use prost::Message as _;
use qvirt_integration_tests::nats::Nats;
use qvirt_integration_tests::{Service, internal_channel};
use qvirt_proto::v1::event_bus_client::EventBusClient;
use qvirt_proto::v1::publish_request::Event;
use qvirt_proto::v1::subscribe_domain_events_response::Kind;
use qvirt_proto::v1::{
    DomainEvent, DomainEventType, HostEventType, HostRecord, PublishRequest,
    SubscribeDomainEventsRequest, SubscribeDomainEventsResponse,
};
use qvirt_registry::{host_key, open_buckets};
use tonic::Streaming;

/// Bound on every wait (a 2 s heartbeat expiring included).
const WAIT: Duration = Duration::from_secs(30);

/// A host id that needs escaping in keys and subjects.
const HOST: &str = "fleet host.1";

async fn fleet_bus(nats: &Nats) -> Service {
    let config = format!(
        "fleet:\n  urls: [{}]\n  token_file: {}\n",
        nats.urls()[0],
        nats.token_file().display()
    );
    let mut svc = Service::start_with_config("qvirt-eventbus", &config, &[]);
    svc.wait_serving("qvirt.v1.EventBus").await;
    // Its registry view has read the buckets: changes from now on count.
    svc.wait_log("registry: following the buckets", WAIT).await;
    svc
}

async fn subscribe(
    bus: &Service,
    request: SubscribeDomainEventsRequest,
) -> Streaming<SubscribeDomainEventsResponse> {
    let mut client = EventBusClient::new(internal_channel(bus.url()).await);
    let mut s = client
        .subscribe_domain_events(request)
        .await
        .unwrap()
        .into_inner();
    assert!(matches!(
        next(&mut s).await.kind,
        Some(Kind::Established(_))
    ));
    s
}

async fn next(s: &mut Streaming<SubscribeDomainEventsResponse>) -> SubscribeDomainEventsResponse {
    tokio::time::timeout(WAIT, s.message())
        .await
        .expect("a message in time")
        .unwrap()
        .expect("the stream goes on")
}

/// The next message must be a host event of [`HOST`] of type `want`.
async fn expect_host_event(s: &mut Streaming<SubscribeDomainEventsResponse>, want: HostEventType) {
    match next(s).await.kind {
        Some(Kind::HostEvent(h)) => {
            assert_eq!((h.host.as_str(), h.r#type()), (HOST, want));
            assert!(h.time.is_some());
        }
        other => panic!("expected a {want:?} host event, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn test_host_events_once_per_change_at_every_gateway_bus() {
    let nats = Nats::single();
    let client = nats.client().await;
    let js = jetstream::new(client);
    // What the hosts' buses and supervisors would have made.
    let mut events = js
        .get_or_create_stream(stream::Config {
            name: "QVIRT_EVENTS".into(),
            subjects: vec!["qvirt.events.>".into()],
            ..Default::default()
        })
        .await
        .unwrap();
    let buckets = open_buckets(&js, 1, Duration::from_secs(2)).await.unwrap();

    let (bus_a, bus_b) = (fleet_bus(&nats).await, fleet_bus(&nats).await);
    // One subscriber filters on the host (and a domain: host events are
    // not about a domain), one takes everything.
    let mut on_a = subscribe(
        &bus_a,
        SubscribeDomainEventsRequest {
            host: HOST.into(),
            domain: "some-domain".into(),
            ..Default::default()
        },
    )
    .await;
    let mut on_b = subscribe(&bus_b, SubscribeDomainEventsRequest::default()).await;
    // A subscriber of another host gets none of them.
    let mut other = subscribe(
        &bus_b,
        SubscribeDomainEventsRequest {
            host: "other".into(),
            ..Default::default()
        },
    )
    .await;

    // The host joins, its heartbeat expires, it comes back.
    let record = HostRecord {
        host: HOST.into(),
        supervisor_url: "http://10.0.0.1:50052".into(),
        ..Default::default()
    };
    let put = || {
        buckets
            .hosts
            .put(host_key(HOST), record.encode_to_vec().into())
    };
    put().await.unwrap();
    for s in [&mut on_a, &mut on_b] {
        expect_host_event(s, HostEventType::Reachable).await;
    }
    for s in [&mut on_a, &mut on_b] {
        expect_host_event(s, HostEventType::Unreachable).await;
    }
    put().await.unwrap();
    for s in [&mut on_a, &mut on_b] {
        expect_host_event(s, HostEventType::Reachable).await;
    }

    // A lifecycle event of each host after them: the next thing each
    // subscriber sees (no second copy of any host event in between, and
    // none of HOST's for the subscriber of another host).
    for (host, subject) in [
        (HOST, "qvirt.events.fleet%20host%2E1.some-domain.lifecycle"),
        ("other", "qvirt.events.other.some-domain.lifecycle"),
    ] {
        let marker = PublishRequest {
            event: Some(Event::DomainEvent(DomainEvent {
                host: host.into(),
                domain_name: "some-domain".into(),
                r#type: DomainEventType::Started as i32,
                ..Default::default()
            })),
        };
        js.publish(subject, marker.encode_to_vec().into())
            .await
            .unwrap()
            .await
            .unwrap();
    }
    for (s, host) in [(&mut on_a, HOST), (&mut on_b, HOST), (&mut other, "other")] {
        match next(s).await.kind {
            Some(Kind::Event(e)) => assert_eq!(e.host, host),
            kind => panic!("expected the lifecycle event of {host}, got {kind:?}"),
        }
    }
    // The stream holds each change once (dedup by message id), and the
    // two lifecycle events.
    let info = events.info().await.unwrap();
    assert_eq!(info.state.messages, 5);
}
