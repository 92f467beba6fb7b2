//! The `qvirt.v1.EventBus` server: the two subscription streams, whose
//! events are encoded once per event and the same bytes sent to every
//! subscriber (any other path goes to the generated routes, which answer
//! UNIMPLEMENTED).
//!
//! With the generated route, each delivery would clone the event's strings
//! and run prost's encoder once per subscriber; with 1,000 subscribers that
//! was most of the bus's CPU. Here an event's message (the response with
//! its sequence number and cursor) is encoded by the first subscriber stream that
//! sends it ([`Envelope::encoded`]); the others copy those bytes into their
//! frame. The bytes on the wire are exactly what the generated route sends.
//! Their bodies are bounded in what HTTP/2 may buffer of them
//! ([`crate::inflight`]).

use std::convert::Infallible;
use std::marker::PhantomData;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{BufMut, Bytes};
use prost::Message;
use qvirt_proto::v1::event_bus_server::EventBusServer;
use qvirt_proto::v1::{
    SubscribeDomainEventsRequest, SubscribeDomainEventsResponse, SubscribeMonitorEventsRequest,
    SubscribeMonitorEventsResponse, subscribe_domain_events_response,
    subscribe_monitor_events_response,
};
use tonic::body::Body;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::{BoxFuture, Service};
use tonic::server::{Grpc, NamedService, ServerStreamingService};
use tonic::{Request, Response, Status};

use crate::hub::Envelope;
use crate::inflight::InFlightBody;
use crate::service::{
    BusEvent, EventBusService, ResponseStream, StreamItem, domain_event, monitor_event,
};
use crate::status::BusError;

const MONITOR_PATH: &str = "/qvirt.v1.EventBus/SubscribeMonitorEvents";
const DOMAIN_PATH: &str = "/qvirt.v1.EventBus/SubscribeDomainEvents";

/// The largest subscription request decoded, in bytes: its fields are
/// bounded far below this (event filter 1 KiB, domain and host 256 bytes),
/// so a bigger one is refused before it is even held.
pub const MAX_SUBSCRIBE_REQUEST: usize = 8 * 1024;

/// The event bus as a tonic service: serve this, not a bare
/// `EventBusServer`.
#[derive(Debug, Clone)]
pub struct BusServer {
    generated: EventBusServer<EventBusService>,
    service: EventBusService,
}

impl BusServer {
    /// The server for `service`.
    pub fn new(service: EventBusService) -> Self {
        BusServer {
            generated: EventBusServer::new(service.clone()),
            service,
        }
    }
}

impl NamedService for BusServer {
    const NAME: &'static str = <EventBusServer<EventBusService> as NamedService>::NAME;
}

impl Service<http::Request<Body>> for BusServer {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        match req.uri().path() {
            MONITOR_PATH => {
                let svc = MonitorStreams(self.service.clone());
                Box::pin(async move {
                    let mut grpc = Grpc::new(PreEncoded::<SubscribeMonitorEventsRequest>::new())
                        .max_decoding_message_size(MAX_SUBSCRIBE_REQUEST);
                    Ok(bounded(grpc.server_streaming(svc, req).await))
                })
            }
            DOMAIN_PATH => {
                let svc = DomainStreams(self.service.clone());
                Box::pin(async move {
                    let mut grpc = Grpc::new(PreEncoded::<SubscribeDomainEventsRequest>::new())
                        .max_decoding_message_size(MAX_SUBSCRIBE_REQUEST);
                    Ok(bounded(grpc.server_streaming(svc, req).await))
                })
            }
            _ => self.generated.call(req),
        }
    }
}

/// A subscription's response, its body bounded in what HTTP/2 may hold of
/// it ([`InFlightBody`]).
fn bounded(response: http::Response<Body>) -> http::Response<Body> {
    response.map(|body| Body::new(InFlightBody::new(body)))
}

fn encode(msg: &impl Message) -> Bytes {
    Bytes::from(msg.encode_to_vec())
}

/// The wire form of a monitor-event subscription's item, its cursor in
/// run `epoch`.
fn monitor_bytes(epoch: &str, item: StreamItem) -> Option<Bytes> {
    use subscribe_monitor_events_response::Kind;
    let kind = match item {
        StreamItem::Established(e) => Kind::Established(e),
        StreamItem::Lost(l) => Kind::Lost(l),
        StreamItem::Host(_) => return None,
        StreamItem::Event(env) => {
            // Only monitor events reach these subscribers, so this is the
            // one wire form of the envelope.
            if !matches!(env.event, BusEvent::Monitor(_)) {
                return None;
            }
            return Some(env.encoded(|env: &Envelope<BusEvent>| {
                let kind = monitor_event(epoch, env).map(Kind::Event);
                encode(&SubscribeMonitorEventsResponse { kind })
            }));
        }
    };
    Some(encode(&SubscribeMonitorEventsResponse { kind: Some(kind) }))
}

/// The wire form of a domain-event subscription's item, its cursor in run
/// `epoch`.
fn domain_bytes(epoch: &str, item: StreamItem) -> Option<Bytes> {
    use subscribe_domain_events_response::Kind;
    let kind = match item {
        StreamItem::Established(e) => Kind::Established(e),
        StreamItem::Lost(l) => Kind::Lost(l),
        StreamItem::Host(h) => Kind::HostEvent(h),
        StreamItem::Event(env) => {
            if !matches!(env.event, BusEvent::Domain(_)) {
                return None;
            }
            return Some(env.encoded(|env: &Envelope<BusEvent>| {
                let kind = domain_event(epoch, env).map(Kind::Event);
                encode(&SubscribeDomainEventsResponse { kind })
            }));
        }
    };
    Some(encode(&SubscribeDomainEventsResponse { kind: Some(kind) }))
}

struct MonitorStreams(EventBusService);

impl ServerStreamingService<SubscribeMonitorEventsRequest> for MonitorStreams {
    type Response = Bytes;
    type ResponseStream = ResponseStream<Bytes>;
    type Future = BoxFuture<Response<Self::ResponseStream>, Status>;

    fn call(&mut self, request: Request<SubscribeMonitorEventsRequest>) -> Self::Future {
        let epoch = Arc::clone(self.0.epoch());
        let result = self
            .0
            .monitor_subscription(request, move |item| monitor_bytes(&epoch, item))
            .map(Response::new);
        Box::pin(std::future::ready(result))
    }
}

struct DomainStreams(EventBusService);

impl ServerStreamingService<SubscribeDomainEventsRequest> for DomainStreams {
    type Response = Bytes;
    type ResponseStream = ResponseStream<Bytes>;
    type Future = BoxFuture<Response<Self::ResponseStream>, Status>;

    fn call(&mut self, request: Request<SubscribeDomainEventsRequest>) -> Self::Future {
        let epoch = Arc::clone(self.0.epoch());
        let result = self
            .0
            .domain_subscription(request, move |item| domain_bytes(&epoch, item))
            .map(Response::new);
        Box::pin(std::future::ready(result))
    }
}

fn buffer_settings() -> BufferSettings {
    BufferSettings::new(
        qvirt_proto::codec::INITIAL_BUFFER,
        qvirt_proto::codec::YIELD_THRESHOLD,
    )
}

/// Decodes requests with prost; sends messages that are already encoded.
struct PreEncoded<Req>(PhantomData<fn() -> Req>);

impl<Req> PreEncoded<Req> {
    fn new() -> Self {
        PreEncoded(PhantomData)
    }
}

impl<Req: Message + Default + Send + 'static> Codec for PreEncoded<Req> {
    type Encode = Bytes;
    type Decode = Req;
    type Encoder = BytesEncoder;
    type Decoder = RequestDecoder<Req>;

    fn encoder(&mut self) -> Self::Encoder {
        BytesEncoder
    }

    fn decoder(&mut self) -> Self::Decoder {
        RequestDecoder(PhantomData)
    }
}

struct BytesEncoder;

impl Encoder for BytesEncoder {
    type Item = Bytes;
    type Error = Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put(item);
        Ok(())
    }

    fn buffer_settings(&self) -> BufferSettings {
        buffer_settings()
    }
}

struct RequestDecoder<Req>(PhantomData<fn() -> Req>);

impl<Req: Message + Default> Decoder for RequestDecoder<Req> {
    type Item = Req;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Req>, Status> {
        Req::decode(src)
            .map(Some)
            .map_err(|e| BusError::Undecodable(e).into())
    }

    fn buffer_settings(&self) -> BufferSettings {
        buffer_settings()
    }
}

#[cfg(test)]
mod tests {
    use qvirt_proto::v1::{DomainEvent, MonitorEvent};

    use super::*;

    fn monitor_env(seq: u64) -> Arc<Envelope<BusEvent>> {
        Arc::new(Envelope::new(
            seq,
            BusEvent::Monitor(MonitorEvent {
                host: "h".into(),
                domain_name: "vm".into(),
                event: "STOP".into(),
                details_json: "{\"n\": 9223372036854775807}".into(),
                ..Default::default()
            }),
        ))
    }

    #[test]
    fn test_event_is_encoded_once_as_the_typed_message() {
        let env = monitor_env(42);
        let first = monitor_bytes("run", StreamItem::Event(Arc::clone(&env))).unwrap();
        let again = monitor_bytes("run", StreamItem::Event(Arc::clone(&env))).unwrap();
        // The same buffer, not a second encoding.
        assert_eq!(first.as_ptr(), again.as_ptr());
        let decoded = SubscribeMonitorEventsResponse::decode(first).unwrap();
        let want = SubscribeMonitorEventsResponse {
            kind: Some(subscribe_monitor_events_response::Kind::Event(
                monitor_event("run", &env).unwrap(),
            )),
        };
        assert_eq!(decoded, want);
        let Some(subscribe_monitor_events_response::Kind::Event(e)) = decoded.kind else {
            unreachable!()
        };
        assert_eq!((e.sequence, e.cursor.as_str()), (42, "1.run.42"));
    }

    #[test]
    fn test_domain_event_wire_form_and_kind_mismatch() {
        let env = Arc::new(Envelope::new(
            7,
            BusEvent::Domain(DomainEvent {
                domain_name: "vm".into(),
                ..Default::default()
            }),
        ));
        let bytes = domain_bytes("run", StreamItem::Event(Arc::clone(&env))).unwrap();
        let decoded = SubscribeDomainEventsResponse::decode(bytes).unwrap();
        let Some(subscribe_domain_events_response::Kind::Event(e)) = decoded.kind else {
            panic!("{decoded:?}")
        };
        assert_eq!(
            (e.sequence, e.domain_name.as_str(), e.cursor.as_str()),
            (7, "vm", "1.run.7")
        );
        // An event of the other kind is skipped, and leaves no wire form.
        assert!(monitor_bytes("run", StreamItem::Event(env)).is_none());
        assert!(domain_bytes("run", StreamItem::Event(monitor_env(8))).is_none());
    }
}
