//! Several workers: SO_REUSEPORT sockets, QUIC-LB connection IDs naming
//! their worker, steering and hand-over of packets whose 4-tuple changed.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common::h3client::{pattern_sha256, Request};
use crate::common::{Backend, H3Client, Options, Spooky};

fn spooky_with_workers(backends: &[&Backend], workers: usize) -> Spooky {
    let mut o = Options::new(backends);
    o.io_extra = format!("workers: {workers}");
    let s = Spooky::start_with(o);
    let until = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while s.log().matches("worker listening").count() < workers && std::time::Instant::now() < until
    {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(
        s.log().matches("worker listening").count(),
        workers,
        "{}",
        s.log()
    );
    s
}

/// How the client changes address mid-download.
#[derive(Clone, Copy)]
enum Move {
    /// NAT rebinding: a new source port, same connection ID, old socket gone.
    Rebind,
    /// Active migration: a new socket and a fresh connection ID, path validated.
    Migrate,
}

/// Three 32 MiB downloads with 2 workers; each client moves after 4 MiB and
/// must still get every byte (the sha256 is checked). Packets from the new
/// address may land on the other worker and are handed to the owner; data
/// the server had in flight towards the old address must be resent (the
/// vendored quiche fix, see vendor/README.md).
fn download_survives_client_move(how: Move) {
    let a = Backend::start("alpha");
    let spooky = spooky_with_workers(&[&a], 2);
    let n: u64 = 32 * 1024 * 1024;
    let rounds = 3;
    for round in 0..rounds {
        let mut c = spooky.client();
        let before = c.local_addr();
        let r =
            c.send_digest_with(
                Request::get(&format!("/bytes/{n}")),
                4 * 1024 * 1024,
                |c| match how {
                    Move::Rebind => c.rebind(),
                    Move::Migrate => c.migrate(),
                },
            );
        let r = r.unwrap_or_else(|e| {
            let (_, m) = crate::common::http1_get(spooky.admin, "/metrics").unwrap();
            let interesting: Vec<&str> = m
                .lines()
                .filter(|l| {
                    l.contains("dropped")
                        || l.contains("handoff")
                        || l.contains("datagrams_total")
                        || l.contains("path_events")
                })
                .collect();
            let paths: Vec<String> = c.quic().path_stats().map(|p| format!("{p:?}")).collect();
            panic!(
                "round {round}: {e}\n{}\nclient: {:?}\nclient paths: {paths:#?}",
                interesting.join("\n"),
                c.stats()
            )
        });
        assert_ne!(
            c.local_addr().port(),
            before.port(),
            "the client must have moved"
        );
        assert_eq!(r.status, 200);
        assert_eq!(r.len, n);
        assert_eq!(r.sha256, pattern_sha256(n));
    }
    // The server saw every move (and says so to operators).
    assert!(
        spooky.metric("spooky_quic_path_events_total", &["peer_migrated"]) >= rounds as f64,
        "{}",
        spooky.log()
    );
}

#[test]
fn client_rebinding_mid_download_finishes_with_two_workers() {
    download_survives_client_move(Move::Rebind);
}

#[test]
fn client_migration_mid_download_finishes_with_two_workers() {
    download_survives_client_move(Move::Migrate);
}

#[test]
fn connections_spread_over_workers_and_all_serve() {
    let a = Backend::start("alpha");
    let b = Backend::start("beta");
    let spooky = spooky_with_workers(&[&a, &b], 2);
    let addr = spooky.addr;
    let handles: Vec<_> = (0..12)
        .map(|_| {
            std::thread::spawn(move || {
                let mut c = H3Client::connect(addr, "localhost").unwrap();
                for _ in 0..5 {
                    assert_eq!(c.get("/id").unwrap().status, 200);
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    assert_eq!(spooky.metric("spooky_requests_total", &["2xx"]), 60.0);
    // Both workers' counters show up in the one scrape.
    assert!(spooky.metric("spooky_quic_connections_opened_total", &[]) >= 12.0);
}

#[test]
fn io_counters_describe_the_driver_in_use() {
    let a = Backend::start("alpha");
    let spooky = spooky_with_workers(&[&a], 2);
    let mut c = spooky.client();
    for _ in 0..20 {
        assert_eq!(c.get("/id").unwrap().status, 200);
    }
    assert_eq!(c.get("/bytes/1000000").unwrap().body.len(), 1_000_000);
    // Counters are published at the end of each worker loop iteration.
    std::thread::sleep(std::time::Duration::from_millis(200));
    let submits = spooky.metric("spooky_io_ring_submissions_total", &[]);
    let completions = spooky.metric("spooky_io_ring_completions_total", &[]);
    let sends = spooky.metric("spooky_io_syscalls_total", &["out"]);
    assert_eq!(spooky.metric("spooky_io_recv_truncated_total", &[]), 0.0);
    match crate::common::test_io_backend().as_str() {
        "uring" => {
            assert!(
                submits > 0.0 && completions > submits,
                "{submits} {completions}"
            );
            // Receives and sends share submissions: fewer enters than datagrams.
            let datagrams = spooky.metric("spooky_io_datagrams_total", &[]);
            assert!(
                submits < datagrams,
                "{submits} submits for {datagrams} datagrams"
            );
        }
        "epoll" => {
            assert_eq!((submits, completions), (0.0, 0.0));
            assert!(sends > 0.0);
        }
        _ => {}
    }
}

#[test]
fn zero_copy_sends_deliver_every_byte() {
    let a = Backend::start("alpha");
    let mut o = Options::new(&[&a]);
    o.io_extra = "workers: 1, zerocopy_send: true".into();
    let spooky = Spooky::start_with(o);
    let mut c = spooky.client();
    for _ in 0..10 {
        assert_eq!(c.get("/id").unwrap().status, 200);
    }
    let n: u64 = 16 * 1024 * 1024;
    let r = c.send_digest(Request::get(&format!("/bytes/{n}"))).unwrap();
    assert_eq!((r.status, r.len), (200, n));
    assert_eq!(r.sha256, pattern_sha256(n));
    let log = spooky.log();
    match crate::common::test_io_backend().as_str() {
        // Kernels without SENDMSG_ZC say so and copy as usual.
        "uring" => assert!(
            log.contains("sends use SENDMSG_ZC") || log.contains("zerocopy_send unavailable"),
            "{log}"
        ),
        "epoll" => assert!(
            log.contains("io.zerocopy_send: needs the io_uring driver"),
            "{log}"
        ),
        _ => {}
    }
}
