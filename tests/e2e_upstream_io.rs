//! `io.upstream_io`: the h2 pools and health checks on the worker's
//! io_uring (`ring`) or on tokio's TCP (`tokio`), one code path either way.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common::h3client::{pattern_sha256, Body, Request};
use crate::common::{test_io_backend, Backend, Options, Spooky};

/// Runs traffic that exercises both directions, many streams and the health
/// checker through spooky started with `upstream_io`.
fn traffic(spooky: &Spooky) {
    let mut c = spooky.client();
    for _ in 0..4 {
        assert_eq!(c.get("/id").unwrap().status, 200);
    }
    let n: u64 = 8 * 1024 * 1024;
    let r = c
        .send_digest(Request {
            method: "GET".into(),
            path: format!("/bytes/{n}"),
            headers: vec![],
            body: Body::Empty,
        })
        .unwrap();
    assert_eq!((r.status, r.len), (200, n));
    assert_eq!(r.sha256, pattern_sha256(n));
    let r = c
        .send(Request {
            method: "POST".into(),
            path: "/echo".into(),
            headers: vec![("content-length".into(), n.to_string())],
            body: Body::Pattern(n),
        })
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.text().contains(&pattern_sha256(n)), "{}", r.text());
    let many: Vec<Request> = (0..100)
        .map(|i| Request::get(&format!("/bytes/{}", 100 + i)))
        .collect();
    for r in c.send_many(many) {
        assert_eq!(r.unwrap().status, 200);
    }
}

fn start(backend: &Backend, upstream_io: &str) -> Spooky {
    let mut o = Options::new(&[backend]);
    o.upstream_io = upstream_io.into();
    // Frequent health checks: they open their own h2 connection through the
    // same transport, and must work with no client traffic at all.
    o.upstreams_yaml = Some(format!(
        "upstreams:\n  - name: app\n    backends: [{{ address: \"{}\" }}]\n    health_check: {{ interval_ms: 50, timeout_ms: 50 }}\n",
        backend.addr
    ));
    Spooky::start_with(o)
}

#[test]
fn ring_transport_carries_pools_and_health_checks() {
    let a = Backend::start("alpha");
    let spooky = start(&a, "ring");
    let on_uring = spooky.log().contains("driver=\"uring\"");
    if test_io_backend() == "uring" {
        assert!(on_uring, "{}", spooky.log());
    }
    // Idle data plane: the health checker alone must make progress (its
    // ring operations are submitted without any UDP traffic waking the loop).
    // (`requests` counts the health checks and the `/stats` reads.)
    let before = a.stat("requests");
    std::thread::sleep(std::time::Duration::from_millis(500));
    let after = a.stat("requests");
    assert!(
        after >= before + 4,
        "health checks stalled with an idle data plane: {before} -> {after}"
    );
    traffic(&spooky);
    let log = spooky.log();
    if on_uring {
        assert!(log.contains("upstream_io=\"ring\""), "{log}");
        assert_eq!(spooky.metric("spooky_upstream_ring_workers", &[]), 1.0);
        let ops = spooky.metric("spooky_upstream_ring_ops_total", &[]);
        assert!(ops > 100.0, "ring carried only {ops} operations");
    } else {
        // The epoll driver has no ring: tokio TCP, with one warning.
        assert!(log.contains("upstream_io=\"tokio\""), "{log}");
        assert!(log.contains("io.upstream_io"), "{log}");
        assert_eq!(spooky.metric("spooky_upstream_ring_ops_total", &[]), 0.0);
    }
}

#[test]
fn tokio_transport_never_touches_the_ring() {
    let a = Backend::start("alpha");
    let spooky = start(&a, "tokio");
    traffic(&spooky);
    let log = spooky.log();
    assert!(log.contains("upstream_io=\"tokio\""), "{log}");
    assert_eq!(spooky.metric("spooky_upstream_ring_workers", &[]), 0.0);
    assert_eq!(spooky.metric("spooky_upstream_ring_ops_total", &[]), 0.0);
}
