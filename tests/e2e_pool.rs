//! Backend pools under load: a busy pool makes requests wait or opens
//! connections, never fails them; it keeps to each backend's announced
//! SETTINGS_MAX_CONCURRENT_STREAMS and shrinks back when idle.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::common::h3client::Request;
use crate::common::{established_to, Backend, H3Client, Options, Spooky};

/// Long enough that every stream of a batch is open at the same time.
const HOLD_MS: u64 = 300;

fn pool_options(backend: &Backend, pool: &str, idle_ms: u64) -> Options {
    let mut o = Options::new(&[backend]);
    o.upstreams_yaml = Some(format!(
        "upstreams:\n  - name: app\n    backends:\n      - {{ address: \"{}\" }}\n    pool: {pool}\n    timeouts: {{ connect_ms: 1000, request_ms: 20000, idle_ms: {idle_ms} }}\n",
        backend.addr
    ));
    o
}

/// `clients` connections, each sending `streams` concurrent slow GETs;
/// returns every status.
fn load(addr: SocketAddr, clients: usize, streams: usize) -> Vec<u16> {
    let handles: Vec<_> = (0..clients)
        .map(|_| {
            std::thread::spawn(move || {
                let mut c = H3Client::connect(addr, "localhost").unwrap();
                c.timeout = Duration::from_secs(60);
                let reqs = (0..streams)
                    .map(|_| Request::get(&format!("/slow?ms={HOLD_MS}")))
                    .collect();
                let statuses: Vec<u16> = c
                    .send_many(reqs)
                    .into_iter()
                    .map(|r| r.map(|r| r.status).unwrap_or(0))
                    .collect();
                let _ = c.close();
                statuses
            })
        })
        .collect();
    handles
        .into_iter()
        .flat_map(|h| h.join().unwrap())
        .collect()
}

fn assert_all_ok(statuses: &[u16], spooky: &Spooky) {
    let bad: Vec<&u16> = statuses.iter().filter(|s| **s != 200).collect();
    assert!(
        bad.is_empty(),
        "{} of {} not 200: {:?}",
        bad.len(),
        statuses.len(),
        &bad[..bad.len().min(20)]
    );
    assert_eq!(spooky.metric("spooky_requests", &["5xx"]), 0.0);
    assert_eq!(spooky.metric("spooky_upstream_pool_rejected", &[]), 0.0);
    assert_eq!(spooky.metric("spooky_upstream_connect_failures", &[]), 0.0);
    assert_eq!(spooky.metric("spooky_upstream_ejections", &[]), 0.0);
}

#[test]
fn four_connections_of_100_streams_through_a_one_connection_pool_all_200() {
    let a = Backend::start("alpha");
    let o = pool_options(
        &a,
        "{ connections_per_backend: 1, max_concurrent_streams: 100 }",
        30_000,
    );
    let spooky = Spooky::start_with(o);
    let statuses = load(spooky.addr, 4, 100);
    assert_eq!(statuses.len(), 400);
    assert_all_ok(&statuses, &spooky);
    // More than one connection's worth ran at once: the pool grew.
    let peak = a.stat("peak_active");
    assert!(peak > 101, "backend saw at most {peak} streams at once");
}

#[test]
fn a_backend_announcing_few_streams_is_respected_without_errors() {
    const ANNOUNCED: u64 = 4;
    const MAX_CONNECTIONS: u64 = 3;
    let a = Backend::start_max_streams("alpha", ANNOUNCED as u32);
    let o = pool_options(
        &a,
        &format!("{{ connections_per_backend: 1, max_concurrent_streams: 100, max_connections_per_backend: {MAX_CONNECTIONS} }}"),
        30_000,
    );
    let spooky = Spooky::start_with(o);
    let statuses = load(spooky.addr, 1, 60);
    assert_eq!(statuses.len(), 60);
    assert_all_ok(&statuses, &spooky);
    assert_eq!(spooky.metric("spooky_upstream_resets", &[]), 0.0);
    assert_eq!(spooky.metric("spooky_upstream_retries", &[]), 0.0);
    // Streams above the announced limit waited in spooky (the health check
    // and `/stats` have streams of their own on other connections).
    let peak = a.stat("peak_active");
    assert!(
        peak <= ANNOUNCED * MAX_CONNECTIONS + 2,
        "backend saw {peak} streams at once"
    );
    // ...and the pool opened more connections rather than queue behind one.
    assert!(
        peak > ANNOUNCED + 2,
        "backend saw at most {peak} streams at once"
    );
}

#[test]
fn idle_pool_connections_close_after_idle_ms() {
    const IDLE_MS: u64 = 2000;
    let a = Backend::start("alpha");
    let o = pool_options(
        &a,
        "{ connections_per_backend: 1, max_concurrent_streams: 50 }",
        IDLE_MS,
    );
    let spooky = Spooky::start_with(o);
    let port = a.addr.port();
    let statuses = load(spooky.addr, 1, 200);
    assert_all_ok(&statuses, &spooky);
    // 200 streams at 50 per connection: the pool grew (plus the health
    // check's own connection).
    let grown = established_to(port);
    assert!(
        grown >= 3,
        "{grown} connections to the backend after the burst"
    );
    // Idle for idle_ms: back to the warm minimum and the health check.
    let until = Instant::now() + Duration::from_millis(IDLE_MS * 10);
    while established_to(port) > 2 && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        established_to(port),
        2,
        "pool did not shrink to its minimum"
    );
    // The warm connection still serves.
    let mut c = spooky.client();
    assert_eq!(c.get("/id").unwrap().text(), "alpha");
}
