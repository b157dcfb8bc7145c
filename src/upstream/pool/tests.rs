#![allow(clippy::unwrap_used, clippy::expect_used)]

use super::*;
use SlotState::{Connecting, Empty, Ready};

/// A view of a pool that may connect, with room in its queue.
fn view() -> PoolView {
    PoolView {
        connectable: true,
        waiting: 0,
        max_waiting: 10,
        is_waiter: false,
        stream_cap: 100,
    }
}

fn ready(in_flight: u32, cap: u32) -> SlotState {
    Ready { in_flight, cap }
}

#[test]
fn packs_streams_onto_the_first_connection_with_room() {
    let slots = [ready(10, 10), ready(5, 10), ready(2, 10), Empty];
    assert_eq!(decide(slots, &view()), Step::Use(1));
    let slots = [ready(1, 1), Connecting, ready(0, 10), ready(9, 10)];
    assert_eq!(decide(slots, &view()), Step::Use(2));
}

#[test]
fn announced_cap_counts_not_the_configured_one() {
    // Slot 0 has fewer streams but the backend allows it only 3.
    let slots = [ready(3, 3), ready(7, 100)];
    assert_eq!(decide(slots, &view()), Step::Use(1));
}

#[test]
fn full_connections_open_another_while_room_is_left() {
    let slots = [ready(100, 100), Empty, Empty];
    assert_eq!(decide(slots, &view()), Step::Open(1));
}

#[test]
fn a_connection_being_opened_absorbs_demand_up_to_its_cap() {
    let slots = [ready(100, 100), Connecting, Empty];
    let mut v = view();
    v.max_waiting = 1000;
    v.waiting = 99;
    assert_eq!(decide(slots, &v), Step::Wait, "100 wanted, 100 coming");
    v.waiting = 100;
    assert_eq!(decide(slots, &v), Step::Open(2), "101 wanted, 100 coming");
}

#[test]
fn at_max_connections_a_request_waits() {
    let slots = [ready(100, 100), ready(100, 100)];
    assert_eq!(decide(slots, &view()), Step::Wait);
}

#[test]
fn a_full_queue_sheds_newcomers_but_not_waiters() {
    let slots = [ready(100, 100), ready(100, 100)];
    let mut v = view();
    v.waiting = 10;
    assert_eq!(decide(slots, &v), Step::QueueFull);
    v.is_waiter = true;
    assert_eq!(decide(slots, &v), Step::Wait);
}

#[test]
fn waiters_go_before_newcomers() {
    let slots = [ready(99, 100)];
    let mut v = view();
    v.waiting = 3;
    assert_eq!(decide(slots, &v), Step::Wait, "a newcomer queues behind");
    v.is_waiter = true;
    assert_eq!(decide(slots, &v), Step::Use(0), "a waiter takes it");
    v.is_waiter = false;
    v.waiting = 10;
    assert_eq!(
        decide(slots, &v),
        Step::Use(0),
        "with the queue full a free stream beats a 503"
    );
}

#[test]
fn a_busy_pool_in_backoff_waits_and_an_empty_one_is_unreachable() {
    let mut v = view();
    v.connectable = false;
    assert_eq!(decide([ready(100, 100), Empty], &v), Step::Wait);
    assert_eq!(decide([Empty, Empty], &v), Step::Unreachable);
    assert_eq!(decide([Connecting, Empty], &v), Step::Wait);
}

#[test]
fn an_empty_pool_opens_its_first_connection() {
    assert_eq!(decide([Empty, Empty], &view()), Step::Open(0));
}

#[test]
fn a_zero_stream_announcement_means_no_room() {
    let slots = [ready(0, 0), Empty];
    assert_eq!(decide(slots, &view()), Step::Open(1));
}

/// A demo backend in this process announcing `max_streams`, on a free port.
async fn backend(max_streams: u32) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let opts = crate::demo_backend::DemoOptions {
        max_concurrent_streams: max_streams,
        ..Default::default()
    };
    tokio::spawn(crate::demo_backend::serve_with_options(
        listener,
        "pool-test".into(),
        opts,
        std::future::pending(),
    ));
    addr
}

fn settings(min: usize, max: usize) -> PoolSettings {
    PoolSettings {
        connections: min,
        max_connections: max,
        max_streams: 100,
        connect_timeout: Duration::from_secs(5),
        idle_timeout: Duration::from_secs(60),
        max_in_flight: 1000,
        max_waiting: 1,
    }
}

/// Runs `f` on a current-thread runtime inside a `LocalSet` (the pool
/// spawns its connection tasks locally, as on a worker).
fn local<F: std::future::Future<Output = ()>>(f: F) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    tokio::task::LocalSet::new().block_on(&rt, f);
}

fn far() -> Instant {
    Instant::now() + Duration::from_secs(10)
}

#[test]
fn pool_grows_within_the_announced_limit_then_queues_then_sheds() {
    local(async {
        let addr = backend(3).await;
        let pool = BackendPool::new(addr, 1, settings(1, 2), Connector::Tokio);
        let mut held = Vec::new();
        for _ in 0..6 {
            held.push(pool.acquire(far()).await.unwrap());
        }
        assert_eq!(pool.connections(), 2, "3 streams each, as announced");
        let gens: Vec<u64> = held.iter().map(|(_, g)| g.conn.generation).collect();
        for g in gens
            .iter()
            .copied()
            .collect::<std::collections::BTreeSet<_>>()
        {
            assert_eq!(gens.iter().filter(|x| **x == g).count(), 3, "{gens:?}");
        }

        // Pool at its maximum: the 7th waits, the 8th finds the queue full.
        let waiter = {
            let pool = pool.clone();
            tokio::task::spawn_local(async move { pool.acquire(far()).await })
        };
        while pool.waiting.get() == 0 {
            tokio::task::yield_now().await;
        }
        let shed = pool.acquire(far()).await;
        assert!(
            matches!(shed, Err(UpstreamError::PoolFull { .. })),
            "{shed:?}"
        );
        // A freed stream goes to the waiter.
        held.pop();
        held.push(waiter.await.unwrap().unwrap());

        // No stream frees up before a deadline: PoolTimeout, not a connect error.
        let soon = Instant::now() + Duration::from_millis(50);
        let late = pool.acquire(soon).await;
        assert!(
            matches!(late, Err(UpstreamError::PoolTimeout { .. })),
            "{late:?}"
        );
        assert_eq!(pool.state().failures.get(), 0);
    });
}

#[test]
fn idle_connections_close_down_to_the_warm_minimum() {
    local(async {
        let addr = backend(1).await;
        let mut s = settings(1, 3);
        s.idle_timeout = Duration::from_millis(100);
        let pool = BackendPool::new(addr, 1, s, Connector::Tokio);
        let held: Vec<_> = {
            let mut v = Vec::new();
            for _ in 0..3 {
                v.push(pool.acquire(far()).await.unwrap());
            }
            v
        };
        assert_eq!(pool.connections(), 3);
        drop(held);
        let until = Instant::now() + Duration::from_secs(10);
        while pool.connections() > 1 && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(pool.connections(), 1, "shrinks to the warm minimum");
        // The one kept still serves.
        pool.acquire(far()).await.unwrap();
    });
}
