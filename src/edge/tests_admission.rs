//! Sans-IO tests of admission: Retry past the half-open threshold, the
//! handshake timeout, Version Negotiation only for full-size datagrams, and
//! the timer heap's compaction. quiche clients talk to an [`Edge`] in memory.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::*;
use crate::config::{Backend, Upstream};
use crate::telemetry::RetryReason;

const SERVER: &str = "127.0.0.1:4433";

struct Lone {
    edge: Edge,
    metrics: Arc<WorkerMetrics>,
    _dir: tempfile::TempDir,
}

fn edge(tweak: impl FnOnce(&mut Config)) -> Lone {
    let dir = tempfile::tempdir().unwrap();
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    std::fs::write(dir.path().join("cert.pem"), ck.cert.pem()).unwrap();
    std::fs::write(dir.path().join("key.pem"), ck.key_pair.serialize_pem()).unwrap();
    let mut cfg = Config::minimal(vec![Upstream::new(
        "app",
        vec![Backend::new(SocketAddr::from(([127, 0, 0, 1], 9)))],
    )]);
    cfg.listen.tls.cert = dir.path().join("cert.pem");
    cfg.listen.tls.key = dir.path().join("key.pem");
    tweak(&mut cfg);
    let metrics = Arc::new(WorkerMetrics::default());
    let edge = Edge::new(
        &cfg,
        0,
        metrics.clone(),
        Box::new(crate::source::FakeSource::new(
            3,
            std::time::SystemTime::now(),
        )),
        Instant::now(),
    )
    .unwrap();
    Lone {
        edge,
        metrics,
        _dir: dir,
    }
}

fn client(port: u16) -> quiche::Connection {
    let mut cc = quiche::Config::new(quiche::PROTOCOL_VERSION).unwrap();
    cc.verify_peer(false);
    cc.set_application_protos(&[b"h3"]).unwrap();
    cc.set_max_idle_timeout(30_000);
    // Room for the server's HTTP/3 control and QPACK streams.
    cc.set_initial_max_data(1 << 20);
    cc.set_initial_max_stream_data_uni(1 << 16);
    cc.set_initial_max_streams_uni(16);
    let from = SocketAddr::from(([127, 0, 0, 1], port));
    let scid = quiche::ConnectionId::from_vec(port.to_be_bytes().repeat(8));
    quiche::connect(
        Some("localhost"),
        &scid,
        from,
        SERVER.parse().unwrap(),
        &mut cc,
    )
    .unwrap()
}

/// Everything the edge wants to send now, as separate datagrams.
fn drain(edge: &mut Edge) -> Vec<(Vec<u8>, TransmitInfo)> {
    let mut out = Vec::new();
    let mut buf = vec![0u8; 65536];
    while let Some(t) = edge.poll_transmit(Instant::now(), &mut buf, 1) {
        out.push((buf[..t.len].to_vec(), t));
    }
    out
}

/// Sends a client's first flight (its Initial) to the edge.
fn send_initial(edge: &mut Edge, c: &mut quiche::Connection) {
    let mut buf = vec![0u8; 65536];
    let (n, info) = c.send(&mut buf).unwrap();
    edge.handle_datagram(Instant::now(), &mut buf[..n], info.from, info.to);
}

#[test]
fn retry_starts_once_half_open_connections_reach_the_threshold() {
    let mut e = edge(|c| {
        c.quic.retry = RetryMode::Auto;
        c.quic.retry_threshold = 2;
    });
    for port in [6001, 6002] {
        send_initial(&mut e.edge, &mut client(port));
        let replies = drain(&mut e.edge);
        let hdr = quiche::Header::from_slice(&mut replies[0].0.clone(), CID_LEN).unwrap();
        assert_eq!(
            hdr.ty,
            quiche::Type::Initial,
            "below the threshold: accepted"
        );
    }
    assert_eq!(e.edge.half_open(), 2);
    assert_eq!(e.metrics.half_open.load(Ordering::Relaxed), 2);

    // The third is asked to prove its address first, and can.
    let mut third = client(6003);
    send_initial(&mut e.edge, &mut third);
    let mut replies = drain(&mut e.edge);
    assert_eq!(replies.len(), 1);
    let (pkt, t) = &mut replies[0];
    let hdr = quiche::Header::from_slice(&mut pkt.clone(), CID_LEN).unwrap();
    assert_eq!(hdr.ty, quiche::Type::Retry);
    assert_eq!(e.edge.connections(), 2, "a Retry allocates nothing");
    assert_eq!(
        e.metrics.retries_by_reason[RetryReason::HalfOpen as usize].load(Ordering::Relaxed),
        1
    );
    third
        .recv(
            &mut pkt[..],
            quiche::RecvInfo {
                from: t.from,
                to: t.to,
            },
        )
        .unwrap();
    send_initial(&mut e.edge, &mut third);
    assert_eq!(e.edge.connections(), 3, "a valid token is admitted");
}

#[test]
fn retry_never_and_always_follow_the_setting() {
    let mut never = edge(|c| {
        c.quic.retry = RetryMode::Never;
        c.quic.retry_threshold = 1;
    });
    for port in 6100..6105 {
        send_initial(&mut never.edge, &mut client(port));
    }
    assert_eq!(never.edge.connections(), 5);
    let mut always = edge(|c| c.quic.retry = RetryMode::Always);
    send_initial(&mut always.edge, &mut client(6200));
    assert_eq!(always.edge.connections(), 0);
    assert_eq!(
        always.metrics.retries_by_reason[RetryReason::Always as usize].load(Ordering::Relaxed),
        1
    );
}

#[test]
fn unfinished_handshake_is_discarded_at_the_timeout() {
    let mut e = edge(|c| {
        c.quic.retry = RetryMode::Never;
        c.quic.handshake_timeout_ms = 3_000;
    });
    let start = Instant::now();
    send_initial(&mut e.edge, &mut client(6300));
    assert!(!drain(&mut e.edge).is_empty());
    assert_eq!(e.edge.half_open(), 1);
    let due = e.edge.poll_timeout().unwrap();
    assert!(due <= start + Duration::from_millis(3_100), "{due:?}");

    // Before the deadline the connection lives on (PTOs may fire).
    e.edge.handle_timeout(start + Duration::from_millis(2_500));
    assert_eq!(e.edge.connections(), 1);
    e.edge.handle_timeout(start + Duration::from_millis(3_100));
    assert_eq!(e.edge.connections(), 0);
    assert_eq!(e.edge.half_open(), 0);
    assert_eq!(e.metrics.half_open.load(Ordering::Relaxed), 0);
    assert_eq!(e.metrics.handshake_timeouts.load(Ordering::Relaxed), 1);
    assert!(drain(&mut e.edge).is_empty(), "discarded silently");
    assert_eq!(e.edge.poll_timeout(), None);
}

/// A long-header Initial of an unknown version, `len` bytes in all.
fn unknown_version_initial(len: usize) -> Vec<u8> {
    let mut p = vec![0xc0];
    p.extend_from_slice(&0x1a2a_3a4a_u32.to_be_bytes());
    p.push(8);
    p.extend_from_slice(&[1; 8]);
    p.push(8);
    p.extend_from_slice(&[2; 8]);
    p.push(0); // token length
    p.resize(len, 0);
    p
}

#[test]
fn version_negotiation_only_for_full_size_datagrams() {
    let mut e = edge(|_| {});
    let from: SocketAddr = "127.0.0.1:6400".parse().unwrap();
    let to: SocketAddr = SERVER.parse().unwrap();
    let mut short = unknown_version_initial(MIN_INITIAL_DATAGRAM - 1);
    e.edge.handle_datagram(Instant::now(), &mut short, from, to);
    assert!(drain(&mut e.edge).is_empty(), "no reply to 1199 bytes");
    assert_eq!(e.metrics.dropped_count(DropReason::ShortInitial), 1);

    let mut full = unknown_version_initial(MIN_INITIAL_DATAGRAM);
    e.edge.handle_datagram(Instant::now(), &mut full, from, to);
    let replies = drain(&mut e.edge);
    assert_eq!(replies.len(), 1);
    let hdr = quiche::Header::from_slice(&mut replies[0].0.clone(), CID_LEN).unwrap();
    assert_eq!(hdr.ty, quiche::Type::VersionNegotiation);
    assert!(replies[0].0.len() <= MIN_INITIAL_DATAGRAM);
}

#[test]
fn timer_heap_stays_bounded_under_peer_traffic() {
    let mut e = edge(|c| c.quic.retry = RetryMode::Never);
    // A connection whose handshake stalls holds the earliest deadline, so
    // entries behind it are not popped as they go stale...
    send_initial(&mut e.edge, &mut client(6501));
    drain(&mut e.edge);
    let mut c = client(6500);
    let mut buf = vec![0u8; 65536];
    let mut most = 0;
    // ...while this one pings: every packet moves its deadline (the idle
    // timeout) later and leaves the old heap entry behind.
    for _ in 0..(TIMER_COMPACT_MIN * 3) {
        if c.is_established() {
            c.send_ack_eliciting().unwrap();
        }
        while let Ok((n, info)) = c.send(&mut buf) {
            e.edge
                .handle_datagram(Instant::now(), &mut buf[..n], info.from, info.to);
        }
        for (mut pkt, t) in drain(&mut e.edge) {
            let info = quiche::RecvInfo {
                from: t.from,
                to: t.to,
            };
            let _ = c.recv(&mut pkt, info);
        }
        // As a driver does: expired timers, then the next deadline.
        e.edge.handle_timeout(Instant::now());
        let _ = e.edge.poll_timeout();
        most = most.max(e.edge.timer_entries());
    }
    assert!(c.is_established());
    assert_eq!(
        e.edge.connections(),
        2,
        "client: {:?} {:?}",
        c.local_error(),
        c.peer_error()
    );
    assert!(
        most > TIMER_COMPACT_MIN / 2,
        "stale entries did pile up ({most})"
    );
    assert!(
        most <= TIMER_COMPACT_MIN + 1,
        "compaction bounds the heap ({most})"
    );
    assert!(e.edge.poll_timeout().is_some(), "the live entry survives");
}
