//! One subscriber's end: replay from the ring, then its live queue.

use std::collections::VecDeque;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll, Waker};

use super::{
    Delivery, Envelope, Inner, OverflowPolicy, Predicate, REPLAY_BATCH, REPLAY_BATCH_BYTES,
    REPLAY_SCAN_LIMIT, SubShared, SubscriberKind,
};

/// An emptied queue keeps room for this many events; beyond, it gives the
/// memory back.
const QUEUE_KEEP: usize = 32;

/// Why events were lost before the next item.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LossReason {
    /// The replay ring no longer held them (`since` too old, or the ring
    /// moved on while this subscriber replayed). The count covers every bus
    /// event in the gap, matching the predicate or not: they are gone and
    /// cannot be tested.
    RingEvicted,
    /// This subscriber's queue was full (matching events only).
    QueueFull,
}

/// What a [`Subscription`] yields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SubscriptionItem<E> {
    /// Always the first item: the subscription is registered; every event
    /// with a sequence number above `last_seq` that matches will follow
    /// (unless reported lost).
    Established {
        /// The last sequence number published before the subscription.
        last_seq: u64,
        /// The oldest sequence number the ring held then (0 if empty).
        oldest_seq: u64,
        /// How many events after `since` the ring no longer held (0 without
        /// `since`).
        lost: u64,
    },
    /// An event, in sequence-number order.
    Event(Arc<Envelope<E>>),
    /// `count` events were lost here, between the previous item and the next.
    Lost {
        /// How many.
        count: u64,
        /// Why.
        reason: LossReason,
    },
}

/// Why a [`Subscription`] ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RecvError {
    /// The subscriber's queue overflowed under [`OverflowPolicy::CutOff`]
    /// (the service answers `RESOURCE_EXHAUSTED`).
    #[error("subscriber cut off: its queue overflowed ({capacity} events or its byte bound)")]
    CutOff {
        /// The queue's capacity.
        capacity: usize,
    },
    /// The hub was closed.
    #[error("event bus closed")]
    Closed,
}

pub(super) struct Parts<E> {
    pub(super) hub: Arc<Inner<E>>,
    pub(super) id: u64,
    pub(super) key: Option<Box<str>>,
    pub(super) kind: SubscriberKind,
    pub(super) principal: Arc<str>,
    pub(super) vouched: bool,
    pub(super) policy: OverflowPolicy,
    pub(super) shared: Arc<SubShared<E>>,
    pub(super) predicate: Predicate<E>,
    pub(super) last_seq: u64,
    pub(super) oldest_seq: u64,
    pub(super) lost: u64,
    pub(super) cursor: u64,
    pub(super) live_start: u64,
}

/// A registered subscriber ([`super::Hub::subscribe`]). Dropping it frees
/// its slot and its queue at once.
///
/// No gap, no duplicate: `subscribe` reads the next sequence number
/// (`live_start`) and registers the live queue under the hub's lock, the lock
/// `publish` holds while it numbers, stores and fans out an event. So every
/// event below `live_start` is in the ring (or was evicted: then reported
/// lost) and never in the queue, and every matching event from `live_start`
/// on is in the queue (or reported lost if it overflowed). The subscription
/// replays `(since, live_start)` from the ring, in batches taken under the
/// lock, then reads the queue; as a second guard, it never yields an event
/// whose number is not above the last one it yielded.
pub struct Subscription<E> {
    hub: Arc<Inner<E>>,
    id: u64,
    key: Option<Box<str>>,
    kind: SubscriberKind,
    principal: Arc<str>,
    vouched: bool,
    policy: OverflowPolicy,
    shared: Arc<SubShared<E>>,
    predicate: Predicate<E>,
    last_seq: u64,
    oldest_seq: u64,
    lost: u64,
    established_pending: bool,
    /// Next sequence number to replay from the ring.
    cursor: u64,
    /// The first sequence number delivered through the queue.
    live_start: u64,
    batch: VecDeque<Arc<Envelope<E>>>,
    stash: Option<Arc<Envelope<E>>>,
    last_yielded: u64,
}

impl<E> fmt::Debug for Subscription<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Subscription")
            .field("id", &self.id)
            .field("kind", &self.kind)
            .field("principal", &self.principal)
            .field("policy", &self.policy)
            .field("last_seq", &self.last_seq)
            .finish_non_exhaustive()
    }
}

impl<E> Subscription<E> {
    pub(super) fn new(p: Parts<E>) -> Self {
        Subscription {
            hub: p.hub,
            id: p.id,
            key: p.key,
            kind: p.kind,
            principal: p.principal,
            vouched: p.vouched,
            policy: p.policy,
            shared: p.shared,
            predicate: p.predicate,
            last_seq: p.last_seq,
            oldest_seq: p.oldest_seq,
            lost: p.lost,
            established_pending: true,
            cursor: p.cursor,
            live_start: p.live_start,
            batch: VecDeque::new(),
            stash: None,
            last_yielded: 0,
        }
    }

    /// The last sequence number published before this subscription (what
    /// [`SubscriptionItem::Established`] carries).
    pub fn established_seq(&self) -> u64 {
        self.last_seq
    }

    /// The kind this subscription counts as.
    pub fn kind(&self) -> SubscriberKind {
        self.kind
    }

    /// The principal this subscription counts against.
    pub fn principal(&self) -> &str {
        &self.principal
    }

    /// The next item, waiting for one if need be. Cancel-safe: an item is
    /// consumed only when returned.
    pub async fn recv(&mut self) -> Result<SubscriptionItem<E>, RecvError> {
        std::future::poll_fn(|cx| self.poll_recv(cx)).await
    }

    /// The next item if one is ready; otherwise `Pending`, and the task in
    /// `cx` is woken when one may be.
    pub fn poll_recv(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<SubscriptionItem<E>, RecvError>> {
        match self.next_item(Some(cx.waker())).transpose() {
            Some(item) => Poll::Ready(item),
            None => Poll::Pending,
        }
    }

    /// The next item if one is ready, without waiting. A replay step scans
    /// the ring under the hub's lock, so it costs at most the ring's length.
    pub fn try_recv(&mut self) -> Result<Option<SubscriptionItem<E>>, RecvError> {
        self.next_item(None)
    }

    /// The next ready item; with `waker`, if there is none, leaves the
    /// waker in the queue under the same lock that found it empty, so no
    /// push can slip between the look and the registration.
    fn next_item(
        &mut self,
        waker: Option<&Waker>,
    ) -> Result<Option<SubscriptionItem<E>>, RecvError> {
        if self.established_pending {
            self.established_pending = false;
            return Ok(Some(SubscriptionItem::Established {
                last_seq: self.last_seq,
                oldest_seq: self.oldest_seq,
                lost: self.lost,
            }));
        }
        if let Some(env) = self.stash.take() {
            return Ok(Some(self.yield_event(env)));
        }
        if let Some(env) = self.batch.pop_front() {
            return Ok(Some(self.yield_event(env)));
        }
        while self.cursor < self.live_start {
            let lost = self.fill_replay();
            if lost > 0 {
                return Ok(Some(SubscriptionItem::Lost {
                    count: lost,
                    reason: LossReason::RingEvicted,
                }));
            }
            if let Some(env) = self.batch.pop_front() {
                return Ok(Some(self.yield_event(env)));
            }
        }
        loop {
            let popped = {
                let mut q = self.shared.lock();
                match q.items.pop_front() {
                    Some(delivery) => {
                        q.bytes -= delivery.bytes;
                        Ok(delivery)
                    }
                    None => {
                        if q.items.capacity() > QUEUE_KEEP {
                            q.items.shrink_to(QUEUE_KEEP);
                        }
                        let lost = std::mem::take(&mut q.pending_lost);
                        if let Some(w) = waker
                            && lost == 0
                            && q.end.is_none()
                        {
                            match &mut q.waker {
                                Some(old) if old.will_wake(w) => {}
                                slot => *slot = Some(w.clone()),
                            }
                        }
                        Err((lost, q.end))
                    }
                }
            };
            match popped {
                Ok(delivery) => {
                    if let Some(item) = self.accept(delivery) {
                        return Ok(Some(item));
                    }
                }
                // Drops only happen on a full queue and are attached to the
                // next push, so a count left here follows every queued event.
                Err((lost, _)) if lost > 0 => {
                    return Ok(Some(SubscriptionItem::Lost {
                        count: lost,
                        reason: LossReason::QueueFull,
                    }));
                }
                Err((_, Some(end))) => return Err(end),
                Err((_, None)) => return Ok(None),
            }
        }
    }

    fn yield_event(&mut self, env: Arc<Envelope<E>>) -> SubscriptionItem<E> {
        self.last_yielded = env.seq;
        SubscriptionItem::Event(env)
    }

    /// Turns a queued delivery into an item (a loss marker first if events
    /// were dropped before it), or `None` for a number already yielded.
    fn accept(&mut self, delivery: Delivery<E>) -> Option<SubscriptionItem<E>> {
        if delivery.env.seq <= self.last_yielded {
            return None;
        }
        if delivery.lost_before > 0 {
            self.stash = Some(delivery.env);
            return Some(SubscriptionItem::Lost {
                count: delivery.lost_before,
                reason: LossReason::QueueFull,
            });
        }
        Some(self.yield_event(delivery.env))
    }

    /// Takes the next batch of matching events from the ring, under the
    /// lock; returns how many events were skipped because the ring no longer
    /// held them.
    fn fill_replay(&mut self) -> u64 {
        let mut lost = 0;
        {
            let st = self.hub.lock();
            let front = st.ring_front_seq();
            if self.cursor < front {
                let to = front.min(self.live_start);
                lost = to - self.cursor;
                self.cursor = to;
            }
            let (mut scanned, mut bytes) = (0, 0);
            while self.cursor < self.live_start
                && self.batch.len() < REPLAY_BATCH
                && bytes < REPLAY_BATCH_BYTES
                && scanned < REPLAY_SCAN_LIMIT
            {
                let slot = usize::try_from(self.cursor - front)
                    .ok()
                    .and_then(|i| st.ring.get(i));
                let Some(slot) = slot else {
                    // Cannot happen (the ring holds front..next_seq and
                    // live_start <= next_seq); end the replay rather than spin.
                    self.cursor = self.live_start;
                    break;
                };
                if (self.predicate)(&slot.env.event) {
                    // Past the byte bound only as its first event.
                    if !self.batch.is_empty() && bytes + slot.bytes > REPLAY_BATCH_BYTES {
                        break;
                    }
                    self.batch.push_back(Arc::clone(&slot.env));
                    bytes += slot.bytes;
                }
                self.cursor += 1;
                scanned += 1;
            }
        }
        let c = &self.hub.counters;
        c.delivered
            .fetch_add(self.batch.len() as u64, Ordering::Relaxed);
        if lost > 0 {
            c.dropped_ring_evicted.fetch_add(lost, Ordering::Relaxed);
        }
        lost
    }
}

impl<E> Drop for Subscription<E> {
    fn drop(&mut self) {
        self.hub.release(
            self.id,
            self.key.as_deref(),
            self.kind,
            (&self.principal, self.vouched),
            self.policy,
        );
    }
}
