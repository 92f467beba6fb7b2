//! Hub tests: ordering, replay, the replay/live seam, overflow policies,
//! caps, freeing, fan-out.

use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::filter::{EventNameFilter, FilterFlags};

const STEP: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, PartialEq, Eq)]
struct Ev {
    name: String,
    n: u64,
}

fn ev(name: &str, n: u64) -> Ev {
    Ev {
        name: name.to_owned(),
        n,
    }
}

fn hub_with(config: HubConfig) -> Hub<Ev> {
    Hub::new(config).expect("valid config")
}

fn hub() -> Hub<Ev> {
    hub_with(HubConfig::default())
}

fn opts(principal: &str, since: Option<u64>) -> SubscribeOptions {
    SubscribeOptions {
        principal: principal.to_owned(),
        since,
        ..Default::default()
    }
}

fn all(_: &Ev) -> bool {
    true
}

async fn next(sub: &mut Subscription<Ev>) -> SubscriptionItem<Ev> {
    tokio::time::timeout(STEP, sub.recv())
        .await
        .expect("an item in time")
        .expect("subscription open")
}

async fn next_seq(sub: &mut Subscription<Ev>) -> u64 {
    match next(sub).await {
        SubscriptionItem::Event(env) => env.seq,
        other => panic!("expected an event, got {other:?}"),
    }
}

async fn established(sub: &mut Subscription<Ev>) -> (u64, u64) {
    match next(sub).await {
        SubscriptionItem::Established { last_seq, lost, .. } => (last_seq, lost),
        other => panic!("expected Established, got {other:?}"),
    }
}

/// Everything ready now, without waiting.
fn drain(sub: &mut Subscription<Ev>) -> Vec<SubscriptionItem<Ev>> {
    let mut out = Vec::new();
    while let Some(item) = sub.try_recv().expect("open") {
        out.push(item);
    }
    out
}

fn seqs(items: &[SubscriptionItem<Ev>]) -> Vec<u64> {
    items
        .iter()
        .filter_map(|i| match i {
            SubscriptionItem::Event(env) => Some(env.seq),
            _ => None,
        })
        .collect()
}

#[test]
fn test_config_validation() {
    for bad in [0, MAX_QUEUE_CAPACITY + 1] {
        let config = HubConfig {
            queue_capacity: bad,
            ..Default::default()
        };
        assert!(matches!(
            Hub::<Ev>::new(config),
            Err(HubConfigError::QueueCapacity { .. })
        ));
    }
}

#[tokio::test]
async fn test_seq_starts_at_one_and_increases() {
    let hub = hub();
    assert_eq!(hub.last_seq(), 0);
    for want in 1..=5 {
        assert_eq!(hub.publish(ev("X", want)), want);
    }
    assert_eq!(hub.last_seq(), 5);
    assert_eq!(hub.stats().published, 5);
}

#[tokio::test]
async fn test_established_first_then_live_in_order() {
    let hub = hub();
    hub.publish(ev("X", 1));
    hub.publish(ev("X", 2));
    let mut sub = hub.subscribe(opts("p", None), all).expect("subscribe");
    assert_eq!(sub.established_seq(), 2);
    assert_eq!(established(&mut sub).await, (2, 0));
    for n in 3..=10 {
        hub.publish(ev("X", n));
    }
    for want in 3..=10 {
        assert_eq!(next_seq(&mut sub).await, want);
    }
    assert!(drain(&mut sub).is_empty());
}

#[tokio::test]
async fn test_predicate_filters_live_and_replay() {
    let hub = hub();
    let filter = EventNameFilter::new("STOP", FilterFlags::default()).expect("filter");
    hub.publish(ev("STOP", 1));
    hub.publish(ev("RESUME", 2));
    let mut sub = hub
        .subscribe(opts("p", Some(0)), move |e: &Ev| filter.matches(&e.name))
        .expect("subscribe");
    assert_eq!(established(&mut sub).await, (2, 0));
    assert_eq!(next_seq(&mut sub).await, 1);
    hub.publish(ev("RESUME", 3));
    hub.publish(ev("STOP", 4));
    assert_eq!(next_seq(&mut sub).await, 4);
    assert!(drain(&mut sub).is_empty());
}

#[tokio::test]
async fn test_waiting_subscriber_is_woken() {
    let hub = hub();
    let mut sub = hub.subscribe(opts("p", None), all).expect("subscribe");
    established(&mut sub).await;
    let publisher = hub.clone();
    let task = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(20)).await;
        publisher.publish(ev("X", 1))
    });
    assert_eq!(next_seq(&mut sub).await, 1);
    assert_eq!(task.await.expect("join"), 1);
}

#[tokio::test]
async fn test_replay_inside_ring_then_live() {
    let hub = hub_with(HubConfig {
        ring_capacity: 10,
        ..Default::default()
    });
    for n in 1..=5 {
        hub.publish(ev("X", n));
    }
    let mut sub = hub.subscribe(opts("p", Some(2)), all).expect("subscribe");
    assert_eq!(established(&mut sub).await, (5, 0));
    hub.publish(ev("X", 6));
    let items = drain(&mut sub);
    assert_eq!(seqs(&items), vec![3, 4, 5, 6]);
    assert_eq!(items.len(), 4, "no marker: {items:?}");

    // since = last: nothing to replay; since beyond last: nothing either.
    for since in [6, 100, u64::MAX] {
        let mut sub = hub.subscribe(opts("p", Some(since)), all).expect("sub");
        assert_eq!(established(&mut sub).await, (6, 0));
        assert!(drain(&mut sub).is_empty());
    }
}

#[tokio::test]
async fn test_replay_outside_ring_reports_lost() {
    let hub = hub_with(HubConfig {
        ring_capacity: 4,
        ..Default::default()
    });
    for n in 1..=10 {
        hub.publish(ev("X", n));
    }
    let mut sub = hub.subscribe(opts("p", Some(2)), all).expect("subscribe");
    // 3..=6 are gone; 7..=10 are in the ring.
    assert_eq!(established(&mut sub).await, (10, 4));
    assert_eq!(seqs(&drain(&mut sub)), vec![7, 8, 9, 10]);
    let stats = hub.stats();
    assert_eq!(stats.dropped_ring_evicted, 4);
    assert_eq!(stats.ring_len, 4);
    assert_eq!(stats.ring_evicted, 6);
}

#[tokio::test]
async fn test_ring_moving_on_during_replay_reports_lost() {
    let hub = hub_with(HubConfig {
        ring_capacity: 4,
        queue_capacity: 64,
        ..Default::default()
    });
    for n in 1..=4 {
        hub.publish(ev("X", n));
    }
    let mut sub = hub.subscribe(opts("p", Some(0)), all).expect("subscribe");
    assert_eq!(established(&mut sub).await, (4, 0));
    // Before the subscriber reads, the ring moves past its replay range.
    for n in 5..=20 {
        hub.publish(ev("X", n));
    }
    let items = drain(&mut sub);
    assert_eq!(
        items.first(),
        Some(&SubscriptionItem::Lost {
            count: 4,
            reason: LossReason::RingEvicted
        })
    );
    assert_eq!(seqs(&items), (5..=20).collect::<Vec<_>>());
}

#[tokio::test]
async fn test_ring_bounded_by_bytes() {
    let config = HubConfig {
        ring_capacity: 100,
        ring_max_bytes: Some(10),
        ..Default::default()
    };
    let hub = Hub::with_size_fn(config, |e: &Ev| e.name.len()).expect("hub");
    hub.publish(ev("AAAA", 1));
    hub.publish(ev("BBBB", 2));
    hub.publish(ev("CCCC", 3)); // 12 bytes: 1 goes
    let stats = hub.stats();
    assert_eq!((stats.ring_len, stats.ring_bytes), (2, 8));
    // An event bigger than the whole budget is not kept at all.
    hub.publish(ev(&"Z".repeat(11), 4));
    let stats = hub.stats();
    assert_eq!((stats.ring_len, stats.ring_bytes), (0, 0));
    let mut sub = hub.subscribe(opts("p", Some(0)), all).expect("subscribe");
    assert_eq!(established(&mut sub).await, (4, 4));
    hub.publish(ev("A", 5));
    assert_eq!(seqs(&drain(&mut sub)), vec![5]);
}

#[tokio::test]
async fn test_ring_capacity_zero_replays_nothing() {
    let hub = hub_with(HubConfig {
        ring_capacity: 0,
        ..Default::default()
    });
    for n in 1..=3 {
        hub.publish(ev("X", n));
    }
    let mut sub = hub.subscribe(opts("p", Some(0)), all).expect("subscribe");
    assert_eq!(established(&mut sub).await, (3, 3));
    assert!(drain(&mut sub).is_empty());
}

#[tokio::test]
async fn test_slow_consumer_gets_coalesced_lost_marker() {
    let hub = hub_with(HubConfig {
        queue_capacity: 4,
        ..Default::default()
    });
    let mut sub = hub.subscribe(opts("p", None), all).expect("subscribe");
    established(&mut sub).await;
    for n in 1..=10 {
        hub.publish(ev("X", n)); // 1..=4 queued, 5..=10 dropped
    }
    hub.publish(ev("X", 11)); // still full: dropped
    let items = drain(&mut sub);
    assert_eq!(seqs(&items), vec![1, 2, 3, 4]);
    assert_eq!(
        items.last(),
        Some(&SubscriptionItem::Lost {
            count: 7,
            reason: LossReason::QueueFull
        })
    );
    assert_eq!(items.len(), 5);
    // Drops after a partial drain are reported right before the next event.
    for n in 12..=20 {
        hub.publish(ev("X", n)); // 12..=15 queued, 16..=20 dropped
    }
    assert_eq!(next_seq(&mut sub).await, 12);
    hub.publish(ev("X", 21)); // room again: queued, carrying the 5 drops
    let items = drain(&mut sub);
    assert_eq!(seqs(&items), vec![13, 14, 15, 21]);
    assert_eq!(
        items[3],
        SubscriptionItem::Lost {
            count: 5,
            reason: LossReason::QueueFull
        }
    );
    assert_eq!(items.len(), 5);
    hub.publish(ev("X", 22));
    assert_eq!(seqs(&drain(&mut sub)), vec![22]);
    let stats = hub.stats();
    assert_eq!(stats.dropped_queue_full, 12);
    assert_eq!(stats.delivered, 10);
}

#[tokio::test]
async fn test_lost_marker_precedes_next_event() {
    let hub = hub_with(HubConfig {
        queue_capacity: 2,
        ..Default::default()
    });
    let mut sub = hub.subscribe(opts("p", None), all).expect("subscribe");
    established(&mut sub).await;
    for n in 1..=5 {
        hub.publish(ev("X", n)); // 1, 2 queued; 3, 4, 5 dropped
    }
    assert_eq!(next_seq(&mut sub).await, 1);
    hub.publish(ev("X", 6)); // queued behind 2, carrying the 3 drops
    let items = drain(&mut sub);
    let want = vec![
        SubscriptionItem::Event(Arc::new(Envelope::new(2, ev("X", 2)))),
        SubscriptionItem::Lost {
            count: 3,
            reason: LossReason::QueueFull,
        },
        SubscriptionItem::Event(Arc::new(Envelope::new(6, ev("X", 6)))),
    ];
    assert_eq!(items, want);
}

#[tokio::test]
async fn test_cut_off_policy() {
    let hub = hub_with(HubConfig {
        queue_capacity: 3,
        ..Default::default()
    });
    let options = SubscribeOptions {
        policy: OverflowPolicy::CutOff,
        ..opts("p", None)
    };
    let mut slow = hub.subscribe(options, all).expect("subscribe");
    let mut fast = hub.subscribe(opts("p", None), all).expect("subscribe");
    established(&mut slow).await;
    assert_eq!(hub.stats().subscribers_cut_off_policy, 1);
    for n in 1..=5 {
        hub.publish(ev("X", n));
        if n <= 3 {
            // `fast` keeps up.
            let items = drain(&mut fast);
            assert_eq!(seqs(&items).last(), Some(&n));
        }
    }
    // What was queued still arrives, then the cut-off.
    for want in 1..=3 {
        assert_eq!(next_seq(&mut slow).await, want);
    }
    let end = tokio::time::timeout(STEP, slow.recv())
        .await
        .expect("in time");
    assert_eq!(end, Err(RecvError::CutOff { capacity: 3 }));
    assert_eq!(slow.try_recv(), Err(RecvError::CutOff { capacity: 3 }));
    let stats = hub.stats();
    assert_eq!(stats.dropped_cut_off, 1);
    // The slot is held until the subscription is dropped.
    assert_eq!(stats.subscribers_monitor, 2);
    drop(slow);
    let stats = hub.stats();
    assert_eq!(stats.subscribers_monitor, 1);
    assert_eq!(stats.subscribers_cut_off_policy, 0);
    // Others are unaffected.
    assert_eq!(seqs(&drain(&mut fast)), vec![4, 5]);
}

#[tokio::test]
async fn test_caps_per_principal_and_total() {
    let monitor_caps = Caps {
        total: 5,
        per_principal: 3,
        reserved: 0,
    };
    let hub = hub_with(HubConfig {
        monitor_caps,
        ..Default::default()
    });
    // Identical subscriptions count too.
    let a: Vec<_> = (0..3)
        .map(|_| hub.subscribe(opts("alice", None), all).expect("under cap"))
        .collect();
    let err = hub
        .subscribe(opts("alice", None), all)
        .expect_err("per-principal cap");
    assert_eq!(
        err,
        SubscribeError::PrincipalCap {
            kind: SubscriberKind::Monitor,
            principal: "alice".into(),
            limit: 3
        }
    );
    assert!(err.to_string().contains("per-principal cap of 3"), "{err}");
    let b: Vec<_> = (0..2)
        .map(|_| hub.subscribe(opts("bob", None), all).expect("under cap"))
        .collect();
    let err = hub
        .subscribe(opts("carol", None), all)
        .expect_err("total cap");
    assert!(
        matches!(err, SubscribeError::TotalCap { limit: 5, .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("total cap of 5"), "{err}");
    // Domain subscriptions have their own caps.
    let domain = SubscribeOptions {
        kind: SubscriberKind::Domain,
        ..opts("alice", None)
    };
    let d = hub.subscribe(domain, all).expect("other kind");
    let stats = hub.stats();
    assert_eq!(
        (
            stats.subscribers_monitor,
            stats.subscribers_domain,
            stats.rejected_subscriptions
        ),
        (5, 1, 2)
    );
    // Dropping frees the slot at once.
    drop(a);
    hub.subscribe(opts("alice", None), all).expect("freed");
    hub.subscribe(opts("carol", None), all).expect("freed");
    drop((b, d));
    assert_eq!(hub.stats().subscribers_monitor, 0);
}

#[tokio::test]
async fn test_open_and_drop_10000_subscriptions_frees_everything() {
    let hub = hub_with(HubConfig {
        monitor_caps: Caps {
            total: 10_000,
            per_principal: 10_000,
            reserved: 0,
        },
        ..Default::default()
    });
    for round in 0..2 {
        let subs: Vec<_> = (0..10_000)
            .map(|i| {
                hub.subscribe(opts("p", Some(0)), move |e: &Ev| e.n % 2 == (i % 2) as u64)
                    .expect("under cap")
            })
            .collect();
        hub.publish(ev("X", round));
        assert_eq!(hub.stats().subscribers_monitor, 10_000);
        hub.subscribe(opts("q", None), all).expect_err("total cap");
        drop(subs);
        let stats = hub.stats();
        assert_eq!(stats.subscribers_monitor, 0);
        let st = hub.inner.lock();
        assert!(st.subscribers.is_empty());
        assert!(
            st.subscribers.capacity() <= 64,
            "{}",
            st.subscribers.capacity()
        );
        assert!(st.slots[0].per_principal.is_empty());
    }
}

#[tokio::test]
async fn test_close_ends_subscriptions_and_refuses_new() {
    let hub = hub();
    let mut sub = hub.subscribe(opts("p", None), all).expect("subscribe");
    established(&mut sub).await;
    hub.publish(ev("X", 1));
    hub.close();
    assert_eq!(next_seq(&mut sub).await, 1);
    let end = tokio::time::timeout(STEP, sub.recv())
        .await
        .expect("in time");
    assert_eq!(end, Err(RecvError::Closed));
    assert_eq!(
        hub.subscribe(opts("p", None), all).expect_err("closed"),
        SubscribeError::Closed
    );
}

#[tokio::test]
async fn test_many_subscribers_each_get_their_matching_events() {
    let hub = hub_with(HubConfig {
        monitor_caps: Caps {
            total: 400,
            per_principal: 64,
            reserved: 0,
        },
        ..Default::default()
    });
    let names = ["STOP", "RESUME", "SHUTDOWN", "RESET"];
    let mut subs = Vec::new();
    for i in 0..400 {
        let name = names[i % names.len()];
        let filter = EventNameFilter::new(name, FilterFlags::default()).expect("filter");
        let sub = hub
            .subscribe(opts(&format!("p{}", i % 7), None), move |e: &Ev| {
                filter.matches(&e.name)
            })
            .expect("subscribe");
        subs.push((name, sub));
    }
    for n in 1..=100u64 {
        let name = names[(n % 4) as usize];
        hub.publish(ev(name, n));
    }
    let mut tasks = tokio::task::JoinSet::new();
    for (name, mut sub) in subs {
        tasks.spawn(async move {
            established(&mut sub).await;
            let got = seqs(&drain(&mut sub));
            let want: Vec<u64> = (1..=100u64)
                .filter(|n| names[(n % 4) as usize] == name)
                .collect();
            assert_eq!(got, want, "{name}");
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.expect("subscriber task");
    }
    let stats = hub.stats();
    assert_eq!(stats.delivered, 100 * 100);
    assert_eq!(stats.dropped_queue_full, 0);
}

/// Subscribers join at random moments, with and without `since`, while a
/// publisher runs flat out on another thread. Every sequence number from the
/// subscriber's start to the end must be accounted for exactly once: as an
/// event, in order, or inside a loss count (small ring and queue force
/// losses).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_no_gap_no_duplicate_under_concurrent_publish() {
    const TOTAL: u64 = 100_000;
    for (ring, queue) in [(1 << 17, 1 << 17), (64, 16)] {
        let hub = hub_with(HubConfig {
            ring_capacity: ring,
            queue_capacity: queue,
            monitor_caps: Caps {
                total: 40,
                per_principal: 40,
                reserved: 0,
            },
            ..Default::default()
        });
        let publisher = {
            let hub = hub.clone();
            tokio::task::spawn_blocking(move || {
                for n in 1..=TOTAL {
                    hub.publish(ev("X", n));
                }
            })
        };
        let mut subscribers = tokio::task::JoinSet::new();
        for i in 0..40u64 {
            let hub = hub.clone();
            subscribers.spawn(async move {
                tokio::time::sleep(Duration::from_micros(i * 500)).await;
                let last = hub.last_seq();
                let since = match i % 3 {
                    0 => None,
                    1 => Some(last.saturating_sub(1000)),
                    _ => Some(0),
                };
                let mut sub = hub.subscribe(opts("p", since), all).expect("subscribe");
                let (start, lost) = established(&mut sub).await;
                let mut expect = match since {
                    None => start + 1,
                    Some(s) => s + 1 + lost,
                };
                let (mut events, mut losses) = (0u64, 0u64);
                while expect <= TOTAL {
                    match next(&mut sub).await {
                        SubscriptionItem::Event(env) => {
                            assert_eq!(env.seq, expect, "subscriber {i}");
                            assert_eq!(env.event.n, env.seq);
                            expect += 1;
                            events += 1;
                        }
                        SubscriptionItem::Lost { count, .. } => {
                            expect += count;
                            losses += count;
                        }
                        other => panic!("unexpected {other:?}"),
                    }
                }
                assert_eq!(expect, TOTAL + 1, "subscriber {i} overshot");
                assert!(events > 0 || start == TOTAL || losses > 0);
                (start, losses)
            });
        }
        let all_done = async {
            let (mut lossless, mut mid_stream) = (true, 0);
            while let Some(done) = subscribers.join_next().await {
                let (start, losses) = done.expect("subscriber");
                lossless &= losses == 0;
                mid_stream += usize::from(start > 0 && start < TOTAL);
            }
            publisher.await.expect("publisher");
            (lossless, mid_stream)
        };
        let (lossless, mid_stream) = tokio::time::timeout(Duration::from_secs(60), all_done)
            .await
            .expect("stress test in time");
        if ring >= TOTAL as usize {
            assert!(lossless, "big ring and queues must lose nothing");
        }
        // The seam was exercised: subscribers joined while events flowed.
        assert!(mid_stream >= 3, "only {mid_stream} joined mid-stream");
    }
}

fn keyed_hub(config: HubConfig) -> Hub<Ev> {
    Hub::with_size_and_key_fn(config, |_| 0, |e: &Ev| Some(e.name.as_str())).expect("valid")
}

fn keyed(principal: &str, key: &str) -> SubscribeOptions {
    SubscribeOptions {
        key: Some(key.into()),
        ..opts(principal, None)
    }
}

#[tokio::test]
async fn test_keyed_subscribers_get_only_their_key_and_still_filter() {
    let hub = keyed_hub(HubConfig::default());
    // Keyed on STOP, and the predicate still decides among STOP events.
    let mut even_stops = hub
        .subscribe(keyed("p", "STOP"), |e: &Ev| {
            e.name == "STOP" && e.n.is_multiple_of(2)
        })
        .expect("subscribe");
    let mut everything = hub.subscribe(opts("p", None), all).expect("subscribe");
    established(&mut even_stops).await;
    established(&mut everything).await;
    for (i, name) in ["STOP", "RESUME", "STOP", "STOP", "RESUME"]
        .iter()
        .enumerate()
    {
        hub.publish(ev(name, i as u64 + 1));
    }
    assert_eq!(seqs(&drain(&mut even_stops)), vec![4]);
    assert_eq!(seqs(&drain(&mut everything)), vec![1, 2, 3, 4, 5]);
    assert_eq!(hub.stats().delivered, 6);
    drop(even_stops);
    hub.publish(ev("STOP", 6));
    assert_eq!(seqs(&drain(&mut everything)), vec![6]);
    assert_eq!(hub.stats().subscribers_monitor, 1);
}

#[tokio::test]
async fn test_keyed_subscriber_cut_off_leaves_its_key_group() {
    let hub = keyed_hub(HubConfig {
        queue_capacity: 1,
        ..Default::default()
    });
    let options = SubscribeOptions {
        policy: OverflowPolicy::CutOff,
        ..keyed("p", "X")
    };
    let mut slow = hub.subscribe(options, all).expect("subscribe");
    let mut twin = hub.subscribe(keyed("q", "X"), all).expect("subscribe");
    established(&mut slow).await;
    established(&mut twin).await;
    for n in 1..=3 {
        hub.publish(ev("X", n));
        assert_eq!(seqs(&drain(&mut twin)), vec![n]);
    }
    assert_eq!(next_seq(&mut slow).await, 1);
    assert_eq!(slow.try_recv(), Err(RecvError::CutOff { capacity: 1 }));
    assert_eq!(hub.stats().dropped_cut_off, 1);
    // Dropping the cut-off subscription after the hub removed its entry
    // frees its slot and leaves its twin in the group.
    drop(slow);
    assert_eq!(hub.stats().subscribers_monitor, 1);
    hub.publish(ev("X", 4));
    assert_eq!(seqs(&drain(&mut twin)), vec![4]);
}

/// Cuts a subscriber off (queue of 2, its third event overflows), then
/// publishes while it reads what was queued: it must get events 1 and 2,
/// then the cut-off, never a later event, and count once.
async fn cut_off_ends_for_good(hub: &Hub<Ev>, options: SubscribeOptions) {
    let options = SubscribeOptions {
        policy: OverflowPolicy::CutOff,
        ..options
    };
    let mut slow = hub
        .subscribe(options, |e: &Ev| e.name.starts_with('X'))
        .expect("subscribe");
    established(&mut slow).await;
    for n in 1..=3 {
        hub.publish(ev("X", n));
    }
    assert_eq!(next_seq(&mut slow).await, 1);
    // Its queue has room again: events from after the cut must still not
    // be queued.
    hub.publish(ev("X", 4));
    assert_eq!(next_seq(&mut slow).await, 2);
    for n in 5..=8 {
        hub.publish(ev("X", n));
    }
    assert_eq!(slow.try_recv(), Err(RecvError::CutOff { capacity: 2 }));
    let stats = hub.stats();
    assert_eq!(stats.dropped_cut_off, 1, "one per cut-off subscriber");
    assert_eq!(stats.delivered, 2);
    // The hub no longer offers it anything, yet its slot is held until the
    // subscription is dropped.
    assert_eq!(stats.subscribers_monitor, 1);
    drop(slow);
    assert_eq!(hub.stats().subscribers_monitor, 0);
}

#[tokio::test]
async fn test_unkeyed_subscriber_cut_off_on_a_keyed_hub_gets_nothing_after() {
    // A predicate and no key: filed with the unkeyed subscribers, while
    // every event has a key.
    cut_off_ends_for_good(
        &keyed_hub(HubConfig {
            queue_capacity: 2,
            ..Default::default()
        }),
        opts("p", None),
    )
    .await;
}

#[tokio::test]
async fn test_keyed_subscriber_cut_off_gets_nothing_after() {
    cut_off_ends_for_good(
        &keyed_hub(HubConfig {
            queue_capacity: 2,
            ..Default::default()
        }),
        keyed("p", "X"),
    )
    .await;
}

#[test]
fn test_an_ended_queue_takes_no_more_events() {
    for policy in [OverflowPolicy::MarkLost, OverflowPolicy::CutOff] {
        let entry = Entry {
            shared: Arc::new(SubShared::new()),
            predicate: None,
            policy,
        };
        let env = Arc::new(Envelope::new(1, ev("X", 1)));
        let bounds = QueueBounds {
            capacity: 4,
            max_bytes: usize::MAX,
        };
        assert!(matches!(entry.offer(&env, 0, bounds), Offer::Queued));
        entry.shared.end(RecvError::Closed);
        assert!(matches!(entry.offer(&env, 0, bounds), Offer::Ended));
        let q = entry.shared.lock();
        assert_eq!((q.items.len(), q.pending_lost), (1, 0));
    }
}

#[tokio::test]
async fn test_key_decides_skips_the_predicate_live_but_not_in_replay() {
    use std::sync::atomic::AtomicUsize;
    let hub = keyed_hub(HubConfig::default());
    for (i, name) in ["STOP", "RESUME", "STOP"].iter().enumerate() {
        hub.publish(ev(name, i as u64 + 1));
    }
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&calls);
    let options = SubscribeOptions {
        key_decides: true,
        ..keyed("p", "STOP")
    };
    let mut stops = hub
        .subscribe(
            SubscribeOptions {
                since: Some(0),
                ..options
            },
            move |e: &Ev| {
                counted.fetch_add(1, Ordering::Relaxed);
                e.name == "STOP"
            },
        )
        .expect("subscribe");
    established(&mut stops).await;
    // The replay looks at every event in the ring, through the predicate.
    assert_eq!(seqs(&drain(&mut stops)), vec![1, 3]);
    assert_eq!(calls.load(Ordering::Relaxed), 3);
    // Live: the index alone picks the STOP events; no predicate call.
    for (i, name) in ["STOP", "RESUME", "STOP"].iter().enumerate() {
        hub.publish(ev(name, i as u64 + 4));
    }
    assert_eq!(seqs(&drain(&mut stops)), vec![4, 6]);
    assert_eq!(calls.load(Ordering::Relaxed), 3);
}

#[tokio::test]
async fn test_queue_bounded_by_bytes() {
    let config = HubConfig {
        queue_capacity: 100,
        queue_max_bytes: Some(10),
        ..Default::default()
    };
    let hub = Hub::with_size_fn(config, |e: &Ev| e.name.len()).expect("hub");
    let mut sub = hub.subscribe(opts("p", None), all).expect("subscribe");
    established(&mut sub).await;
    hub.publish(ev("AAAA", 1));
    hub.publish(ev("BBBB", 2));
    hub.publish(ev("CCCC", 3)); // 12 bytes: over the bound, dropped
    hub.publish(ev("DD", 4)); // 10 bytes: fits
    assert_eq!(hub.stats().dropped_queue_full, 1);
    let items = drain(&mut sub);
    assert_eq!(seqs(&items), vec![1, 2, 4]);
    assert_eq!(
        items[2],
        SubscriptionItem::Lost {
            count: 1,
            reason: LossReason::QueueFull
        }
    );
    // Popping gives the bytes back; an empty queue takes one event of any
    // size, and nothing after it while it is there.
    hub.publish(ev(&"Z".repeat(11), 5));
    hub.publish(ev("E", 6));
    let items = drain(&mut sub);
    assert_eq!(seqs(&items), vec![5]);
    assert_eq!(
        items[1],
        SubscriptionItem::Lost {
            count: 1,
            reason: LossReason::QueueFull
        }
    );
    hub.publish(ev("F", 7));
    assert_eq!(seqs(&drain(&mut sub)), vec![7]);
}

#[tokio::test]
async fn test_replay_batch_bounded_by_bytes() {
    let config = HubConfig {
        ring_capacity: 1000,
        ..Default::default()
    };
    let size = REPLAY_BATCH_BYTES / 4;
    let hub = Hub::with_size_fn(config, move |_: &Ev| size).expect("hub");
    for n in 1..=10 {
        hub.publish(ev("X", n));
    }
    let mut sub = hub.subscribe(opts("p", Some(0)), all).expect("subscribe");
    established(&mut sub).await;
    assert_eq!(next_seq(&mut sub).await, 1);
    // One batch taken (and counted delivered): four events of a quarter of
    // the byte bound each, not the ten the count bound would take.
    assert_eq!(hub.stats().delivered, 4);
    let items = drain(&mut sub);
    assert_eq!(seqs(&items), (2..=10).collect::<Vec<_>>());
}

#[test]
fn test_reserved_slots_go_only_to_vouched_principals() {
    let hub = hub_with(HubConfig {
        monitor_caps: Caps {
            total: 4,
            per_principal: 4,
            reserved: 2,
        },
        ..Default::default()
    });
    let direct = |p: &str| opts(p, None);
    let vouched = |p: &str| SubscribeOptions {
        vouched: true,
        ..opts(p, None)
    };
    let a = hub.subscribe(direct("peer:a"), all).expect("first direct");
    let _b = hub.subscribe(direct("peer:b"), all).expect("second direct");
    // Direct callers, whoever they are, stop at total - reserved.
    assert_eq!(
        hub.subscribe(direct("peer:c"), all).unwrap_err(),
        SubscribeError::DirectCap {
            kind: SubscriberKind::Monitor,
            limit: 2
        }
    );
    let _alice = hub.subscribe(vouched("alice"), all).expect("reserved slot");
    let _bob = hub.subscribe(vouched("bob"), all).expect("reserved slot");
    assert!(matches!(
        hub.subscribe(vouched("carol"), all),
        Err(SubscribeError::TotalCap { limit: 4, .. })
    ));
    // A freed slot below the line goes to a direct caller again.
    drop(a);
    hub.subscribe(direct("peer:c"), all).expect("room again");
    assert_eq!(hub.stats().rejected_subscriptions, 2);
}
