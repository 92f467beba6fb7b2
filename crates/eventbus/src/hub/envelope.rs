//! [`Envelope`]: an event as the hub stores and delivers it.

use std::sync::OnceLock;

use bytes::Bytes;

/// An event as the hub stores and delivers it: shared, never copied.
#[derive(Debug, Clone)]
pub struct Envelope<E> {
    /// Its bus-wide sequence number.
    pub seq: u64,
    /// The event.
    pub event: E,
    /// The event as its subscribers receive it on the wire, encoded by the
    /// first subscriber that sends it and shared by all the others
    /// ([`Envelope::encoded`]).
    wire: OnceLock<Bytes>,
}

impl<E> Envelope<E> {
    /// Event `event` numbered `seq`.
    pub fn new(seq: u64, event: E) -> Self {
        Envelope {
            seq,
            event,
            wire: OnceLock::new(),
        }
    }

    /// The event's wire form: `encode`'s result, computed once per event
    /// whoever asks first. Every caller must encode the same way (the bus
    /// has one wire form per kind of event).
    pub fn encoded(&self, encode: impl FnOnce(&Self) -> Bytes) -> Bytes {
        self.wire.get_or_init(|| encode(self)).clone()
    }
}

/// Envelopes are equal when their number and event are: the cached wire
/// form does not count.
impl<E: PartialEq> PartialEq for Envelope<E> {
    fn eq(&self, other: &Self) -> bool {
        self.seq == other.seq && self.event == other.event
    }
}

impl<E: Eq> Eq for Envelope<E> {}
