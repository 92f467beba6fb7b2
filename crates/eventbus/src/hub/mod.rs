//! The in-memory event hub: sequence numbers, the replay ring, fan-out to
//! bounded per-subscriber queues, and the caps on subscriptions. It knows
//! nothing of gRPC; the `qvirt.v1.EventBus` service wraps it.
//!
//! - [`Hub::publish`] gives each event the next bus-wide sequence number
//!   (strictly increasing from 1 within a run; nothing is persisted, so a
//!   restarted bus starts again at 1), stores it in a ring bounded by count
//!   and optionally by bytes, and offers it to every subscriber whose
//!   predicate matches. It never waits: a subscriber whose queue is full loses
//!   the event (and is told how many it lost) or is cut off, by its
//!   [`OverflowPolicy`].
//! - [`Hub::subscribe`] registers a subscriber and returns a [`Subscription`]
//!   whose first item is [`SubscriptionItem::Established`] with the last
//!   sequence number published so far; with `since`, the events the ring
//!   still holds after `since` come next, then live events, with no gap and no
//!   duplicate (see [`Subscription`] for how).
//! - Caps ([`Caps`]) bound the subscriptions per principal and in all, per
//!   [`SubscriberKind`]; dropping a [`Subscription`] frees its slot at once.
//!
//! Memory is bounded whatever subscribers do: the ring holds at most
//! [`HubConfig::ring_capacity`] events, each subscriber's queue at most
//! [`HubConfig::queue_capacity`] events and [`HubConfig::queue_max_bytes`]
//! bytes (an event stays alive while a queue holds it, even after the ring
//! has let it go), a replay batch at most [`REPLAY_BATCH`] events and
//! [`REPLAY_BATCH_BYTES`] bytes, and there are at most [`Caps::total`]
//! subscribers of each kind.
//!
//! Locking: one `std::sync::Mutex` guards the hub's state, and one each
//! subscriber's queue (taken inside the hub's, never the other way round).
//! They are held only for short, synchronous sections (publish, subscribe, a
//! replay batch, a queue push or pop, drop) and never across an `.await`; as
//! tokio's docs advise for such data, they are not async mutexes (a `Drop`
//! must be able to take them). A subscriber waits for events by leaving its
//! task's waker in its queue ([`Subscription::poll_recv`]), so a gRPC
//! response stream can poll it directly, with no task or channel of its
//! own.
//!
//! Fan-out cost: subscribers whose predicate needs one exact event key
//! (a literal, case-sensitive event-name filter; see
//! [`Hub::with_size_and_key_fn`] and [`SubscribeOptions::key`]) are indexed by that
//! key, so `publish` only visits them for events with that key; the others
//! are tested one by one. With [`SubscribeOptions::key_decides`] the key is
//! the whole test, and `publish` does not call the predicate at all.

mod envelope;
mod settings;
mod subscription;
#[cfg(test)]
mod tests;

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use std::task::Waker;

pub use envelope::Envelope;
pub(crate) use settings::REPLAY_SCAN_LIMIT;
pub use settings::{
    Caps, DEFAULT_MAX_SUBSCRIPTIONS, DEFAULT_MAX_SUBSCRIPTIONS_PER_PRINCIPAL,
    DEFAULT_QUEUE_CAPACITY, DEFAULT_RING_CAPACITY, HubConfig, HubConfigError, MAX_QUEUE_CAPACITY,
    OverflowPolicy, REPLAY_BATCH, REPLAY_BATCH_BYTES, SubscribeError, SubscribeOptions,
    SubscriberKind,
};
pub use subscription::{LossReason, RecvError, Subscription, SubscriptionItem};

/// Counters and gauges of a hub, read at one instant ([`Hub::stats`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HubStats {
    /// The last sequence number given (0 before the first event).
    pub last_seq: u64,
    /// Events published.
    pub published: u64,
    /// Events handed to subscribers: put in a live queue or replayed.
    pub delivered: u64,
    /// Events a subscriber did not get because its queue was full
    /// ([`OverflowPolicy::MarkLost`]).
    pub dropped_queue_full: u64,
    /// Events that overflowed a queue and cut its subscriber off
    /// ([`OverflowPolicy::CutOff`]); one per cut-off subscriber.
    pub dropped_cut_off: u64,
    /// Events a replaying subscriber asked for that the ring no longer held.
    pub dropped_ring_evicted: u64,
    /// Events the ring has evicted to stay in its bounds.
    pub ring_evicted: u64,
    /// Events in the ring now.
    pub ring_len: usize,
    /// Bytes of events in the ring now (0 without a size function).
    pub ring_bytes: usize,
    /// Live monitor-event subscriptions now.
    pub subscribers_monitor: usize,
    /// Live domain-event subscriptions now.
    pub subscribers_domain: usize,
    /// Live subscriptions with [`OverflowPolicy::CutOff`] now.
    pub subscribers_cut_off_policy: usize,
    /// Subscriptions refused by a cap.
    pub rejected_subscriptions: u64,
}

type Predicate<E> = Arc<dyn Fn(&E) -> bool + Send + Sync>;
type SizeFn<E> = Box<dyn Fn(&E) -> usize + Send + Sync>;
type KeyFn<E> = Box<dyn for<'a> Fn(&'a E) -> Option<&'a str> + Send + Sync>;
type TapFn<E> = Box<dyn Fn(&Arc<Envelope<E>>) + Send + Sync>;

/// One queued event, with how many events were dropped just before it.
struct Delivery<E> {
    lost_before: u64,
    env: Arc<Envelope<E>>,
    /// Its size, as counted in [`SubQueue::bytes`].
    bytes: usize,
}

/// A subscriber's bounded queue, shared by its hub entry (the producer)
/// and its [`Subscription`] (the consumer). Events dropped on overflow are
/// counted in `pending_lost` and attached to the next queued event, so a
/// loss is always reported exactly where it happened.
struct SubShared<E> {
    queue: Mutex<SubQueue<E>>,
}

struct SubQueue<E> {
    /// Allocated on the first event, so an idle subscriber costs no queue.
    items: VecDeque<Delivery<E>>,
    /// The sizes of the events in `items`.
    bytes: usize,
    /// The consumer's waker, left when it found the queue empty; taken and
    /// woken by the next push or by the end.
    waker: Option<Waker>,
    /// Events dropped since the last one queued.
    pending_lost: u64,
    /// Set when the hub cut the subscriber off or closed.
    end: Option<RecvError>,
}

impl<E> SubShared<E> {
    fn new() -> Self {
        SubShared {
            queue: Mutex::new(SubQueue {
                items: VecDeque::new(),
                bytes: 0,
                waker: None,
                pending_lost: 0,
                end: None,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, SubQueue<E>> {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Ends the queue: the consumer gets what it holds, then `why`.
    fn end(&self, why: RecvError) {
        let waker = {
            let mut q = self.lock();
            q.end.get_or_insert(why);
            q.waker.take()
        };
        if let Some(w) = waker {
            w.wake();
        }
    }
}

/// What happened to one event offered to one subscriber.
enum Offer {
    Queued,
    Dropped,
    CutOff,
    /// The queue had already ended (cut off or closed): nothing queued,
    /// nothing counted.
    Ended,
}

/// A subscriber as the publisher sees it.
struct Entry<E> {
    shared: Arc<SubShared<E>>,
    /// `None` when the index key alone decides.
    predicate: Option<Predicate<E>>,
    policy: OverflowPolicy,
}

impl<E> Entry<E> {
    fn offer(&self, env: &Arc<Envelope<E>>, bytes: usize, bounds: QueueBounds) -> Offer {
        let mut q = self.shared.lock();
        // An ended queue takes nothing more: its consumer is to get what
        // it holds, then the end, never an event from after the end.
        if q.end.is_some() {
            return Offer::Ended;
        }
        let fits = q.items.is_empty() || q.bytes.saturating_add(bytes) <= bounds.max_bytes;
        if q.items.len() < bounds.capacity && fits {
            let lost_before = std::mem::take(&mut q.pending_lost);
            q.items.push_back(Delivery {
                lost_before,
                env: Arc::clone(env),
                bytes,
            });
            q.bytes += bytes;
            // The consumer only leaves a waker on an empty queue.
            let waker = q.waker.take();
            drop(q);
            if let Some(w) = waker {
                w.wake();
            }
            return Offer::Queued;
        }
        match self.policy {
            OverflowPolicy::MarkLost => {
                q.pending_lost += 1;
                Offer::Dropped
            }
            OverflowPolicy::CutOff => {
                q.end = Some(RecvError::CutOff {
                    capacity: bounds.capacity,
                });
                let waker = q.waker.take();
                drop(q);
                if let Some(w) = waker {
                    w.wake();
                }
                Offer::CutOff
            }
        }
    }
}

/// What one subscriber's queue may hold.
#[derive(Clone, Copy)]
struct QueueBounds {
    capacity: usize,
    max_bytes: usize,
}

struct Slot<E> {
    env: Arc<Envelope<E>>,
    bytes: usize,
}

#[derive(Default)]
struct KindSlots {
    total: usize,
    /// Held by principals the gateway did not vouch for.
    direct: usize,
    per_principal: HashMap<Arc<str>, usize>,
}

struct State<E> {
    next_seq: u64,
    /// Consecutive sequence numbers, oldest first.
    ring: VecDeque<Slot<E>>,
    ring_bytes: usize,
    /// Subscribers without an index key, by id: offered every event.
    subscribers: HashMap<u64, Entry<E>>,
    /// Subscribers with an index key, by key and id: offered only events
    /// with that key.
    keyed: HashMap<Box<str>, HashMap<u64, Entry<E>>>,
    next_id: u64,
    slots: [KindSlots; 2],
    cut_off_policy: usize,
    closed: bool,
}

impl<E> State<E> {
    /// Removes subscriber `id`, filed under `key`, if still there.
    fn unregister(&mut self, id: u64, key: Option<&str>) {
        match key {
            None => {
                self.subscribers.remove(&id);
                shrink_if_sparse(&mut self.subscribers);
            }
            Some(k) => {
                if let Some(group) = self.keyed.get_mut(k) {
                    group.remove(&id);
                    if group.is_empty() {
                        self.keyed.remove(k);
                        shrink_if_sparse(&mut self.keyed);
                    } else {
                        shrink_if_sparse(group);
                    }
                }
            }
        }
    }

    /// The sequence number of the oldest event in the ring, or the next one
    /// to be given when the ring is empty.
    fn ring_front_seq(&self) -> u64 {
        self.ring.front().map_or(self.next_seq, |s| s.env.seq)
    }
}

#[derive(Default)]
struct Counters {
    published: AtomicU64,
    delivered: AtomicU64,
    dropped_queue_full: AtomicU64,
    dropped_cut_off: AtomicU64,
    dropped_ring_evicted: AtomicU64,
    ring_evicted: AtomicU64,
    rejected_subscriptions: AtomicU64,
}

struct Inner<E> {
    config: HubConfig,
    size_fn: Option<SizeFn<E>>,
    key_fn: Option<KeyFn<E>>,
    /// Sees every stored event, in sequence order, under the lock.
    tap: std::sync::OnceLock<TapFn<E>>,
    state: Mutex<State<E>>,
    counters: Counters,
}

impl<E> Inner<E> {
    fn lock(&self) -> MutexGuard<'_, State<E>> {
        // The state stays consistent at every unlock point; a panic in a
        // predicate must not take the whole bus down with poisoning.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The event hub. Cheap to clone: clones share one hub.
pub struct Hub<E> {
    inner: Arc<Inner<E>>,
}

impl<E> Clone for Hub<E> {
    fn clone(&self) -> Self {
        Hub {
            inner: Arc::clone(&self.inner),
        }
    }
}

impl<E> fmt::Debug for Hub<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Hub")
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

impl<E: Clone + Send + Sync + 'static> Hub<E> {
    /// A hub whose ring is bounded by count only.
    pub fn new(config: HubConfig) -> Result<Self, HubConfigError> {
        Self::build(config, None, None)
    }

    /// A hub whose ring is also bounded by [`HubConfig::ring_max_bytes`],
    /// each event weighing `size(&event)` bytes.
    pub fn with_size_fn(
        config: HubConfig,
        size: impl Fn(&E) -> usize + Send + Sync + 'static,
    ) -> Result<Self, HubConfigError> {
        Self::build(config, Some(Box::new(size)), None)
    }

    /// A hub like [`Hub::with_size_fn`] that also indexes subscribers by
    /// event key: `key(&event)` is compared with [`SubscribeOptions::key`].
    pub fn with_size_and_key_fn(
        config: HubConfig,
        size: impl Fn(&E) -> usize + Send + Sync + 'static,
        key: impl for<'a> Fn(&'a E) -> Option<&'a str> + Send + Sync + 'static,
    ) -> Result<Self, HubConfigError> {
        Self::build(config, Some(Box::new(size)), Some(Box::new(key)))
    }

    fn build(
        config: HubConfig,
        size_fn: Option<SizeFn<E>>,
        key_fn: Option<KeyFn<E>>,
    ) -> Result<Self, HubConfigError> {
        config.validate()?;
        let state = State {
            next_seq: 1,
            ring: VecDeque::new(),
            ring_bytes: 0,
            subscribers: HashMap::new(),
            keyed: HashMap::new(),
            next_id: 0,
            slots: Default::default(),
            cut_off_policy: 0,
            closed: false,
        };
        Ok(Hub {
            inner: Arc::new(Inner {
                config,
                size_fn,
                key_fn,
                tap: std::sync::OnceLock::new(),
                state: Mutex::new(state),
                counters: Counters::default(),
            }),
        })
    }

    /// Hands every event stored from now on to `tap`, in sequence order:
    /// it runs under the hub's lock, so it must not wait (a bounded
    /// channel's `try_send` at most). Only the first tap set counts
    /// (`false` if one was set already).
    pub fn set_tap(&self, tap: impl Fn(&Arc<Envelope<E>>) + Send + Sync + 'static) -> bool {
        self.inner.tap.set(Box::new(tap)).is_ok()
    }

    /// The hub's settings.
    pub fn config(&self) -> &HubConfig {
        &self.inner.config
    }

    /// Stores `event` under the next sequence number, offers it to every
    /// matching subscriber without waiting, and returns that number.
    pub fn publish(&self, event: E) -> u64 {
        let inner = &*self.inner;
        let bytes = inner.size_fn.as_ref().map_or(0, |size| size(&event));
        let mut guard = inner.lock();
        let st = &mut *guard;
        let seq = st.next_seq;
        st.next_seq += 1;
        let env = Arc::new(Envelope::new(seq, event));
        if let Some(tap) = inner.tap.get() {
            tap(&env);
        }

        st.ring.push_back(Slot {
            env: Arc::clone(&env),
            bytes,
        });
        st.ring_bytes += bytes;
        let max_bytes = inner.config.ring_max_bytes.unwrap_or(usize::MAX);
        let mut evicted = 0u64;
        while st.ring.len() > inner.config.ring_capacity || st.ring_bytes > max_bytes {
            let Some(old) = st.ring.pop_front() else {
                break;
            };
            st.ring_bytes -= old.bytes;
            evicted += 1;
        }

        let (mut delivered, mut dropped_full) = (0u64, 0u64);
        // Each cut subscriber with the map it is filed in: the unkeyed
        // ones (`None`) are not under the event's key.
        let mut cut_ids: Vec<(u64, Option<&str>)> = Vec::new();
        let bounds = QueueBounds {
            capacity: inner.config.queue_capacity,
            max_bytes: inner.config.queue_max_bytes.unwrap_or(usize::MAX),
        };
        let key = inner.key_fn.as_ref().and_then(|k| k(&env.event));
        let unkeyed = st.subscribers.iter().map(|(id, e)| (*id, e, None));
        let keyed = key
            .and_then(|k| st.keyed.get(k))
            .into_iter()
            .flatten()
            .map(|(id, e)| (*id, e, key));
        for (id, entry, filed_under) in unkeyed.chain(keyed) {
            if entry.predicate.as_ref().is_some_and(|p| !p(&env.event)) {
                continue;
            }
            match entry.offer(&env, bytes, bounds) {
                Offer::Queued => delivered += 1,
                Offer::Dropped => dropped_full += 1,
                Offer::CutOff => cut_ids.push((id, filed_under)),
                Offer::Ended => {}
            }
        }
        let cut = cut_ids.len() as u64;
        for (id, filed_under) in cut_ids {
            st.unregister(id, filed_under);
        }
        drop(guard);

        let c = &inner.counters;
        c.published.fetch_add(1, Ordering::Relaxed);
        c.ring_evicted.fetch_add(evicted, Ordering::Relaxed);
        c.delivered.fetch_add(delivered, Ordering::Relaxed);
        c.dropped_queue_full
            .fetch_add(dropped_full, Ordering::Relaxed);
        c.dropped_cut_off.fetch_add(cut, Ordering::Relaxed);
        if cut > 0 {
            tracing::debug!(seq, subscribers = cut, "cut off slow subscribers");
        }
        seq
    }

    /// Registers a subscriber for the events `predicate` accepts.
    ///
    /// Past a cap of `options.kind`, a [`SubscribeError`] naming the cap.
    pub fn subscribe(
        &self,
        options: SubscribeOptions,
        predicate: impl Fn(&E) -> bool + Send + Sync + 'static,
    ) -> Result<Subscription<E>, SubscribeError> {
        let inner = &*self.inner;
        let predicate: Predicate<E> = Arc::new(predicate);
        let caps = inner.config.caps(options.kind);
        let mut guard = inner.lock();
        let st = &mut *guard;
        if st.closed {
            return Err(SubscribeError::Closed);
        }
        let slots = &mut st.slots[options.kind.index()];
        let direct_limit = caps.total.saturating_sub(caps.reserved);
        let refused = if slots.total >= caps.total {
            Some(SubscribeError::TotalCap {
                kind: options.kind,
                limit: caps.total,
            })
        } else if !options.vouched && slots.direct >= direct_limit {
            Some(SubscribeError::DirectCap {
                kind: options.kind,
                limit: direct_limit,
            })
        } else {
            None
        };
        if let Some(e) = refused {
            drop(guard);
            inner
                .counters
                .rejected_subscriptions
                .fetch_add(1, Ordering::Relaxed);
            return Err(e);
        }
        let (principal, held) = match slots
            .per_principal
            .get_key_value(options.principal.as_str())
        {
            Some((key, held)) => (Arc::clone(key), *held),
            None => (Arc::from(options.principal.as_str()), 0),
        };
        if held >= caps.per_principal {
            drop(guard);
            inner
                .counters
                .rejected_subscriptions
                .fetch_add(1, Ordering::Relaxed);
            return Err(SubscribeError::PrincipalCap {
                kind: options.kind,
                principal: options.principal,
                limit: caps.per_principal,
            });
        }
        slots.total += 1;
        if !options.vouched {
            slots.direct += 1;
        }
        slots.per_principal.insert(Arc::clone(&principal), held + 1);
        if options.policy == OverflowPolicy::CutOff {
            st.cut_off_policy += 1;
        }

        // Everything below `live_start` comes from the ring, everything from
        // it on through the queue: both bounds are read, and the entry
        // registered, under this one lock, which `publish` also holds.
        let last_seq = st.next_seq - 1;
        let oldest_seq = st.ring.front().map_or(0, |s| s.env.seq);
        let live_start = st.next_seq;
        let (cursor, lost) = match options.since {
            None => (live_start, 0),
            Some(since) => {
                let wanted = since.saturating_add(1).min(live_start);
                let start = wanted.max(st.ring_front_seq());
                (start, start - wanted)
            }
        };
        if lost > 0 {
            inner
                .counters
                .dropped_ring_evicted
                .fetch_add(lost, Ordering::Relaxed);
        }
        let shared = Arc::new(SubShared::new());
        let id = st.next_id;
        st.next_id += 1;
        let key = if inner.key_fn.is_some() {
            options.key
        } else {
            None
        };
        let entry = Entry {
            shared: Arc::clone(&shared),
            predicate: (key.is_none() || !options.key_decides).then(|| Arc::clone(&predicate)),
            policy: options.policy,
        };
        match &key {
            Some(k) => {
                st.keyed.entry(k.clone()).or_default().insert(id, entry);
            }
            None => {
                st.subscribers.insert(id, entry);
            }
        }
        drop(guard);

        Ok(Subscription::new(subscription::Parts {
            hub: Arc::clone(&self.inner),
            id,
            key,
            kind: options.kind,
            principal,
            vouched: options.vouched,
            policy: options.policy,
            shared,
            predicate,
            last_seq,
            oldest_seq,
            lost,
            cursor,
            live_start,
        }))
    }

    /// The last sequence number given (0 before the first event).
    pub fn last_seq(&self) -> u64 {
        self.inner.lock().next_seq - 1
    }

    /// Ends every subscription (each receives what its queue holds, then
    /// [`RecvError::Closed`]) and refuses new ones; for shutdown. Publishing
    /// still works.
    pub fn close(&self) {
        let mut st = self.inner.lock();
        st.closed = true;
        for entry in st.subscribers.values() {
            entry.shared.end(RecvError::Closed);
        }
        for entry in st.keyed.values().flat_map(HashMap::values) {
            entry.shared.end(RecvError::Closed);
        }
        st.subscribers.clear();
        st.subscribers.shrink_to_fit();
        st.keyed = HashMap::new();
    }

    /// The counters and gauges now.
    pub fn stats(&self) -> HubStats {
        let (last_seq, ring_len, ring_bytes, monitor, domain, cut_off_policy) = {
            let st = self.inner.lock();
            (
                st.next_seq - 1,
                st.ring.len(),
                st.ring_bytes,
                st.slots[SubscriberKind::Monitor.index()].total,
                st.slots[SubscriberKind::Domain.index()].total,
                st.cut_off_policy,
            )
        };
        let c = &self.inner.counters;
        HubStats {
            last_seq,
            published: c.published.load(Ordering::Relaxed),
            delivered: c.delivered.load(Ordering::Relaxed),
            dropped_queue_full: c.dropped_queue_full.load(Ordering::Relaxed),
            dropped_cut_off: c.dropped_cut_off.load(Ordering::Relaxed),
            dropped_ring_evicted: c.dropped_ring_evicted.load(Ordering::Relaxed),
            ring_evicted: c.ring_evicted.load(Ordering::Relaxed),
            ring_len,
            ring_bytes,
            subscribers_monitor: monitor,
            subscribers_domain: domain,
            subscribers_cut_off_policy: cut_off_policy,
            rejected_subscriptions: c.rejected_subscriptions.load(Ordering::Relaxed),
        }
    }
}

impl<E> Inner<E> {
    /// Frees what subscription `id` holds in the hub: its entry (if still
    /// there) and its slots.
    fn release(
        &self,
        id: u64,
        key: Option<&str>,
        kind: SubscriberKind,
        (principal, vouched): (&str, bool),
        policy: OverflowPolicy,
    ) {
        let mut guard = self.lock();
        let st = &mut *guard;
        st.unregister(id, key);
        let slots = &mut st.slots[kind.index()];
        slots.total = slots.total.saturating_sub(1);
        if !vouched {
            slots.direct = slots.direct.saturating_sub(1);
        }
        if let Some(held) = slots.per_principal.get_mut(principal) {
            *held = held.saturating_sub(1);
            if *held == 0 {
                slots.per_principal.remove(principal);
                shrink_if_sparse(&mut slots.per_principal);
            }
        }
        if policy == OverflowPolicy::CutOff {
            st.cut_off_policy = st.cut_off_policy.saturating_sub(1);
        }
    }
}

/// Gives memory back once a map is mostly empty, so that a burst of
/// subscriptions does not pin its peak forever.
fn shrink_if_sparse<K: Eq + std::hash::Hash, V>(map: &mut HashMap<K, V>) {
    if map.capacity() > 64 && map.len() < map.capacity() / 4 {
        map.shrink_to_fit();
    }
}
