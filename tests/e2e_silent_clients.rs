//! Clients that open many large downloads and then go silent (no reads, no
//! ACKs) must pin only what the budgets allow, must not stop other clients
//! from being served, must never count against the backends, and their
//! backend streams must be reset once their connections are gone.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use crate::common::h3client::ClientOptions;
use crate::common::{Backend, H3Client, Options, Spooky};

/// Silent clients, and streams each opens.
const SILENT_CLIENTS: usize = 4;
const STREAMS_PER_CLIENT: usize = 100;
/// Each stuck stream asks for 10 MiB: far more than any buffer on the way.
const LARGE: &str = "/bytes/10485760";

/// Budgets the test runs spooky with (`limits`).
const INITIAL_GRANT: u64 = 16 * 1024;
const CONN_BUDGET: u64 = 1024 * 1024;
/// spooky's h2 stream window (`upstream::pool::STREAM_WINDOW`).
const H2_STREAM_WINDOW: u64 = 64 * 1024;
/// Per-stream state that is not body bytes (quiche + HTTP/3 stream, h2
/// stream, request slab entry, task and channels), and slack for body
/// bytes held in larger allocations than their length (h2 hands out
/// slices of its read buffer), generously rounded up.
const STREAM_OVERHEAD: u64 = 48 * 1024;
/// What quiche may hold per silent connection: its send buffer is bounded
/// by the congestion window (a silent client never ACKs, so it never grows
/// past the initial ~14 KB), plus spooky's scratch; rounded up a lot.
const CONN_OVERHEAD: u64 = 512 * 1024;
/// The peer's idle timeout the silent clients announce: spooky closes
/// their connections this long after their last packet.
const SILENT_IDLE_MS: u64 = 6000;

fn vm_kib(pid: u32, key: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {key} in /proc/{pid}/status"))
}

fn wait_until(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let until = Instant::now() + limit;
    while Instant::now() < until {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    f()
}

#[test]
fn silent_clients_pin_bounded_memory_and_others_are_served() {
    let b1 = Backend::start("b1");
    let b2 = Backend::start("b2");
    let mut o = Options::new(&[&b1, &b2]);
    // Enough pool streams for the 400 stuck streams and everyone else: pool
    // sizing is not what this test is about.
    o.upstreams_yaml = Some(format!(
        "upstreams:\n  - name: app\n    backends:\n      - {{ address: \"{}\" }}\n      - {{ address: \"{}\" }}\n    pool: {{ connections_per_backend: 4, max_concurrent_streams: 100 }}\n    timeouts: {{ connect_ms: 1000, request_ms: 10000, idle_ms: 30000 }}\n",
        b1.addr, b2.addr
    ));
    o.max_body_buffer_bytes = 1024 * 1024;
    o.limits_extra = format!(
        "initial_body_buffer_bytes: {INITIAL_GRANT}, max_connection_buffer_bytes: {CONN_BUDGET}, max_worker_buffer_bytes: {}",
        64 * 1024 * 1024
    );
    let spooky = Spooky::start_with(o);
    let pid = spooky.pid().unwrap();

    // Warm up (pool connections, first allocations), then the baseline.
    let mut other = spooky.client();
    for _ in 0..10 {
        assert_eq!(other.get("/bytes/100000").unwrap().status, 200);
    }
    let baseline = vm_kib(pid, "VmRSS:");

    // Silent clients: a huge flow-control window (so quiche's window is
    // never what holds spooky back), then silence.
    let opts = ClientOptions {
        idle_timeout_ms: SILENT_IDLE_MS,
        ..ClientOptions::default()
    };
    let mut silent: Vec<H3Client> = (0..SILENT_CLIENTS)
        .map(|_| H3Client::connect_with(spooky.addr, "localhost", opts.clone()).unwrap())
        .collect();
    for c in &mut silent {
        let ids = c.open_and_go_silent(LARGE, STREAMS_PER_CLIENT).unwrap();
        assert_eq!(ids.len(), STREAMS_PER_CLIENT);
    }
    let stuck = (SILENT_CLIENTS * STREAMS_PER_CLIENT) as u64;
    // Every stuck stream reached a backend and is being held there.
    assert!(
        wait_until(Duration::from_millis(SILENT_IDLE_MS / 2), || {
            b1.stat("active") + b2.stat("active") >= stuck
        }),
        "backends never saw all {stuck} downloads: {} + {}",
        b1.stat("active"),
        b2.stat("active")
    );
    // Let every buffer on the way fill up.
    std::thread::sleep(Duration::from_millis(500));

    // Others are served meanwhile, small and large.
    for _ in 0..20 {
        assert_eq!(other.get("/bytes/1000").unwrap().status, 200);
    }
    let big = other.get("/bytes/4194304").unwrap();
    assert_eq!(big.status, 200);
    assert_eq!(big.body.len(), 4 * 1024 * 1024);
    let mut fresh = spooky.client();
    assert_eq!(fresh.get("/bytes/1000").unwrap().status, 200);

    // Memory pinned by the stuck streams, derived from the budgets: each
    // stream holds its initial grant in the edge, one h2 stream window of
    // data the backend already sent, and its per-stream state; growth
    // above the initial grants is capped per connection by CONN_BUDGET;
    // quiche holds at most about a congestion window per connection.
    let per_stream = INITIAL_GRANT + H2_STREAM_WINDOW + STREAM_OVERHEAD;
    let bound_kib =
        (stuck * per_stream + SILENT_CLIENTS as u64 * (CONN_BUDGET + CONN_OVERHEAD)) / 1024;
    let rss = vm_kib(pid, "VmRSS:");
    let hwm = vm_kib(pid, "VmHWM:");
    eprintln!(
        "silent clients: baseline {baseline} KiB, with {stuck} stuck streams {rss} KiB (peak {hwm} KiB), {} KiB per stuck stream, bound {bound_kib} KiB",
        rss.saturating_sub(baseline) / stuck
    );
    assert!(
        rss.saturating_sub(baseline) <= bound_kib,
        "RSS grew {} KiB with {stuck} stuck streams (bound {bound_kib} KiB)",
        rss - baseline
    );
    assert!(
        hwm.saturating_sub(baseline) <= bound_kib + 16 * 1024,
        "peak RSS {hwm} KiB, baseline {baseline} KiB (bound {bound_kib} KiB + 16 MiB for the 4 MiB download)"
    );

    // Once spooky times the silent connections out, their backend streams
    // are reset (the demo backend counts them gone).
    assert!(
        wait_until(Duration::from_millis(SILENT_IDLE_MS * 3), || {
            b1.stat("active") + b2.stat("active") == 0
        }),
        "backend streams still open after the silent clients timed out: {} + {}",
        b1.stat("active"),
        b2.stat("active")
    );
    assert!(b1.stat("resets") + b2.stat("resets") >= stuck);
    drop(silent);

    // Waiting on silent clients never counted against the backends.
    assert_eq!(spooky.metric("spooky_upstream_ejections_total", &[]), 0.0);
    assert_eq!(spooky.metric("spooky_upstream_retries_total", &[]), 0.0);
    assert_eq!(other.get("/bytes/1000").unwrap().status, 200);
    eprintln!(
        "after the silent clients: {} KiB (baseline {baseline} KiB)",
        vm_kib(pid, "VmRSS:")
    );
}

/// A client that disappears without a word (its socket closed, as when
/// its process is killed) while 20 large downloads are in flight: the
/// ICMP port unreachable its address draws ends the connection within
/// `UNREACHABLE_GRACE` (1 s), long before the 60 s idle timeout, and
/// every one of its backend streams is reset. The backends are not
/// blamed, and the next client is served.
#[test]
fn a_client_whose_port_is_gone_is_dropped_and_its_backend_streams_reset() {
    client_port_gone(1);
}

/// The same with two workers: the kernel queues the ICMP report on the
/// worker socket the 4-tuple hashes to, which need not own the
/// connection; the owner gets it handed over.
#[test]
fn a_client_whose_port_is_gone_is_dropped_whichever_worker_hears_of_it() {
    client_port_gone(2);
}

fn client_port_gone(workers: usize) {
    const STREAMS: usize = 20;
    let b = Backend::start("b");
    let mut o = Options::new(&[&b]);
    o.quic_extra = "  idle_timeout_ms: 60000\n".into();
    o.io_extra = format!("workers: {workers}");
    let spooky = Spooky::start_with(o);
    let mut gone = H3Client::connect_with(
        spooky.addr,
        "localhost",
        ClientOptions {
            idle_timeout_ms: 60_000,
            ..ClientOptions::default()
        },
    )
    .unwrap();
    gone.open_and_go_silent(LARGE, STREAMS).unwrap();
    assert!(
        wait_until(Duration::from_secs(10), || {
            spooky.metric("spooky_requests_in_flight", &[]) >= STREAMS as f64
        }),
        "the downloads never started"
    );
    // The socket closes: whatever spooky sends there now draws an ICMP
    // port unreachable.
    let closed_at = Instant::now();
    drop(gone);
    assert!(
        wait_until(Duration::from_secs(8), || {
            spooky.metric("spooky_quic_unreachable_closes_total", &[]) >= 1.0
        }),
        "the connection to a closed port was not dropped (ICMP reports: {}); log:\n{}",
        spooky.metric("spooky_quic_icmp_unreachable_total", &[]),
        spooky.log()
    );
    let took = closed_at.elapsed();
    assert!(
        wait_until(Duration::from_secs(5), || {
            spooky.metric("spooky_requests_in_flight", &[]) == 0.0
        }),
        "requests of the vanished client still in flight"
    );
    eprintln!("client port closed: connection dropped after {took:?}");
    assert!(took < Duration::from_secs(8), "{took:?}");
    assert_eq!(spooky.metric("spooky_quic_connections_active", &[]), 0.0);
    assert_eq!(spooky.metric("spooky_upstream_ejections_total", &[]), 0.0);
    let mut next = spooky.client();
    assert_eq!(next.get("/").unwrap().status, 200);
}
