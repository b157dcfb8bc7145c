//! Sans-IO tests: a quiche HTTP/3 client and an [`Edge`] exchange packets in
//! memory, with no sockets and no upstream tasks; the test plays the
//! upstream side through the bridge channels.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::cell::RefCell;
use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use quiche::h3::{self, NameValue};

use super::unreachable::UNREACHABLE_GRACE;
use super::*;
use crate::config::{Backend, Upstream};
use crate::router::bridge::{RequestEvent, ToEdge, ToUpstream};
use crate::router::Envelope;
use crate::router::ResponseHead;
use crate::source::FakeSource;

/// Response events the test (playing the request path) sends the edge.
#[derive(Clone, Default)]
struct Outbox(Rc<RefCell<VecDeque<(RequestKey, ToEdge)>>>);

impl Outbox {
    fn try_recv(&mut self) -> Result<(RequestKey, ToEdge), ()> {
        self.0.borrow_mut().pop_front().ok_or(())
    }
}

/// What the edge handed the request path, sorted by request.
#[derive(Default)]
struct Routed {
    heads: VecDeque<(RequestKey, Box<Envelope>)>,
    bodies: HashMap<RequestKey, VecDeque<ToUpstream>>,
    cancelled: HashSet<RequestKey>,
}

/// The request path's end of one request, played by the test.
struct UpstreamSide {
    key: RequestKey,
    edge: SideTx,
    body: BodyRx,
    routed: Rc<RefCell<Routed>>,
}

impl UpstreamSide {
    /// The edge cancelled the request (as of the last `Pair::route`).
    fn cancelled(&self) -> bool {
        self.routed.borrow().cancelled.contains(&self.key)
    }
}

/// Sends one request's response events to the edge.
#[derive(Clone)]
struct SideTx {
    key: RequestKey,
    out: Outbox,
}

impl SideTx {
    fn send(&self, msg: ToEdge) {
        self.out.0.borrow_mut().push_back((self.key, msg));
    }
}

/// One request's body events, as routed by `Pair::route`.
struct BodyRx {
    key: RequestKey,
    routed: Rc<RefCell<Routed>>,
}

impl BodyRx {
    fn try_recv(&mut self) -> Result<ToUpstream, ()> {
        let mut r = self.routed.borrow_mut();
        r.bodies
            .get_mut(&self.key)
            .and_then(VecDeque::pop_front)
            .ok_or(())
    }
}

struct Pair {
    edge: Edge,
    rx: Outbox,
    routed: Rc<RefCell<Routed>>,
    client: quiche::Connection,
    h3: Option<h3::Connection>,
    client_addr: SocketAddr,
    server_addr: SocketAddr,
    _dir: tempfile::TempDir,
}

fn config(dir: &std::path::Path, budget: usize) -> Config {
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    std::fs::write(dir.join("cert.pem"), ck.cert.pem()).unwrap();
    std::fs::write(dir.join("key.pem"), ck.key_pair.serialize_pem()).unwrap();
    let mut cfg = Config::minimal(vec![Upstream::new(
        "app",
        vec![Backend::new(SocketAddr::from(([127, 0, 0, 1], 9)))],
    )]);
    cfg.listen.tls.cert = dir.join("cert.pem");
    cfg.listen.tls.key = dir.join("key.pem");
    cfg.limits.max_body_buffer_bytes = budget;
    cfg
}

/// A quiche HTTP/3 client connection to `server`, not yet handshaken.
fn new_client(seed: u8, from: SocketAddr, server: SocketAddr) -> quiche::Connection {
    let mut cc = quiche::Config::new(quiche::PROTOCOL_VERSION).unwrap();
    cc.verify_peer(false);
    cc.set_application_protos(&[b"h3"]).unwrap();
    cc.set_initial_max_data(16 << 20);
    cc.set_initial_max_stream_data_bidi_local(4 << 20);
    cc.set_initial_max_stream_data_bidi_remote(4 << 20);
    cc.set_initial_max_stream_data_uni(1 << 20);
    cc.set_initial_max_streams_bidi(100);
    cc.set_initial_max_streams_uni(100);
    cc.set_max_idle_timeout(5000);
    let scid = quiche::ConnectionId::from_vec(vec![seed; 16]);
    quiche::connect(Some("localhost"), &scid, from, server, &mut cc).unwrap()
}

/// The pseudo-headers of a request to `https://localhost{path}`.
fn request_fields(method: &str, path: &str) -> Vec<h3::Header> {
    vec![
        h3::Header::new(b":method", method.as_bytes()),
        h3::Header::new(b":scheme", b"https"),
        h3::Header::new(b":authority", b"localhost"),
        h3::Header::new(b":path", path.as_bytes()),
    ]
}

impl Pair {
    fn new(budget: usize) -> Pair {
        Pair::with(budget, |_| {})
    }

    fn with(budget: usize, tweak: impl FnOnce(&mut Config)) -> Pair {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = config(dir.path(), budget);
        tweak(&mut cfg);
        let edge = Edge::new(
            &cfg,
            0,
            Arc::new(WorkerMetrics::default()),
            Box::new(FakeSource::new(7, std::time::SystemTime::now())),
            Instant::now(),
        )
        .unwrap();
        let client_addr: SocketAddr = "127.0.0.1:5000".parse().unwrap();
        let server_addr: SocketAddr = "127.0.0.1:4433".parse().unwrap();
        let client = new_client(7, client_addr, server_addr);
        let mut p = Pair {
            edge,
            rx: Outbox::default(),
            routed: Rc::default(),
            client,
            h3: None,
            client_addr,
            server_addr,
            _dir: dir,
        };
        p.handshake();
        assert!(
            p.client.is_established(),
            "client: local {:?} peer {:?} closed {} conns {}",
            p.client.local_error(),
            p.client.peer_error(),
            p.client.is_closed(),
            p.edge.connections()
        );
        p.h3 = Some(
            h3::Connection::with_transport(&mut p.client, &h3::Config::new().unwrap()).unwrap(),
        );
        p.exchange();
        p
    }

    /// Runs the client's handshake for a bounded number of rounds.
    fn handshake(&mut self) {
        for _ in 0..20 {
            self.exchange();
            if self.client.is_established() {
                break;
            }
        }
    }

    /// Replaces the client by a new connection (CIDs from `seed`) from
    /// `from`; true when its handshake completes.
    fn reconnect(&mut self, seed: u8, from: SocketAddr) -> bool {
        self.client = new_client(seed, from, self.server_addr);
        self.client_addr = from;
        self.h3 = None;
        self.handshake();
        self.client.is_established()
    }

    /// Moves packets both ways until both sides are quiet.
    fn exchange(&mut self) {
        let mut buf = vec![0u8; 65536];
        for _ in 0..200 {
            let mut moved = false;
            loop {
                match self.client.send(&mut buf) {
                    Ok((n, info)) => {
                        self.edge.handle_datagram(
                            Instant::now(),
                            &mut buf[..n],
                            info.from,
                            info.to,
                        );
                        moved = true;
                    }
                    Err(quiche::Error::Done) => break,
                    Err(e) => panic!("client send: {e}"),
                }
            }
            while let Some(t) = self.edge.poll_transmit(Instant::now(), &mut buf, 1) {
                let info = quiche::RecvInfo {
                    from: t.from,
                    to: t.to,
                };
                assert_eq!(t.to, self.client_addr);
                assert_eq!(t.from, self.server_addr);
                let _ = self.client.recv(&mut buf[..t.len], info);
                moved = true;
            }
            if !moved {
                break;
            }
        }
    }

    fn request(&mut self, method: &str, path: &str, fin: bool) -> u64 {
        let hdrs = request_fields(method, path);
        let h3c = self.h3.as_mut().unwrap();
        let sid = h3c.send_request(&mut self.client, &hdrs, fin).unwrap();
        self.exchange();
        sid
    }

    /// Sorts the edge's request events by request.
    fn route(&mut self) {
        while let Some(EdgeEvent { key, event }) = self.edge.poll_event() {
            let mut r = self.routed.borrow_mut();
            match event {
                RequestEvent::Head { envelope, .. } => r.heads.push_back((key, envelope)),
                RequestEvent::Body(b) => r.bodies.entry(key).or_default().push_back(b),
                RequestEvent::Cancel => {
                    r.cancelled.insert(key);
                }
                RequestEvent::ResponseCredit(_) | RequestEvent::ResponseGrant(_) => {}
            }
        }
    }

    fn take_request(&mut self) -> (Box<Envelope>, UpstreamSide) {
        self.route();
        let Some((key, envelope)) = self.routed.borrow_mut().heads.pop_front() else {
            panic!("no request event");
        };
        let side = UpstreamSide {
            key,
            edge: SideTx {
                key,
                out: self.rx.clone(),
            },
            body: BodyRx {
                key,
                routed: self.routed.clone(),
            },
            routed: self.routed.clone(),
        };
        (envelope, side)
    }

    fn deliver(&mut self) {
        while let Ok((k, m)) = self.rx.try_recv() {
            self.edge.handle_upstream(Instant::now(), k, m);
        }
        self.exchange();
        self.route();
    }

    /// Reads client-side events: (status, body bytes, finished, reset code).
    fn client_events(&mut self) -> (Option<String>, Vec<u8>, bool, Option<u64>) {
        let mut status = None;
        let mut body = Vec::new();
        let mut fin = false;
        let mut reset = None;
        let h3c = self.h3.as_mut().unwrap();
        let mut buf = vec![0u8; 65536];
        loop {
            match h3c.poll(&mut self.client) {
                Ok((_, h3::Event::Headers { list, .. })) => {
                    for h in list {
                        if h.name() == b":status" {
                            status = Some(String::from_utf8_lossy(h.value()).into_owned());
                        }
                    }
                }
                Ok((sid, h3::Event::Data)) => {
                    while let Ok(n) = h3c.recv_body(&mut self.client, sid, &mut buf) {
                        body.extend_from_slice(&buf[..n]);
                    }
                }
                Ok((_, h3::Event::Finished)) => fin = true,
                Ok((_, h3::Event::Reset(c))) => reset = Some(c),
                Ok(_) => {}
                Err(h3::Error::Done) => break,
                Err(e) => panic!("client h3: {e}"),
            }
        }
        (status, body, fin, reset)
    }
}

#[test]
fn request_becomes_envelope_and_response_flows_back() {
    let mut p = Pair::new(64 * 1024);
    p.request("GET", "/hello", true);
    let (env, side) = p.take_request();
    assert_eq!(env.path, "/hello");
    assert_eq!(env.authority, "localhost");
    assert!(!env.has_body);
    let edge_tx = side.edge.clone();
    edge_tx.send(ToEdge::Headers {
        head: ResponseHead::new(http::StatusCode::OK),
        head_after: std::time::Duration::ZERO,
    });
    edge_tx.send(ToEdge::Data(Bytes::from_static(b"hi there")));
    edge_tx.send(ToEdge::End);
    p.deliver();
    let (status, body, fin, reset) = p.client_events();
    assert_eq!(status.as_deref(), Some("200"));
    assert_eq!(body, b"hi there");
    assert!(fin);
    assert_eq!(reset, None);
    assert_eq!(p.edge.requests_in_flight(), 0);
}

#[test]
fn request_body_is_read_only_within_the_budget() {
    let budget = 4096;
    let mut p = Pair::new(budget);
    let sid = p.request("POST", "/echo", false);
    let payload = vec![0xabu8; 100_000];
    let mut sent = 0;
    // Push as much as the client's flow control allows.
    for _ in 0..50 {
        let h3c = p.h3.as_mut().unwrap();
        if sent < payload.len() {
            if let Ok(n) = h3c.send_body(&mut p.client, sid, &payload[sent..], false) {
                sent += n;
            }
        }
        p.exchange();
    }
    let (_env, mut side) = p.take_request();
    let mut received = 0usize;
    while let Ok(ToUpstream::Data(b)) = side.body.try_recv() {
        received += b.len();
    }
    assert!(received > 0);
    assert!(
        received <= budget,
        "edge read {received} bytes past a {budget} budget"
    );
    // Returning the budget lets more through.
    side.edge.send(ToEdge::RequestCredit(received));
    p.deliver();
    let mut more = 0usize;
    while let Ok(ToUpstream::Data(b)) = side.body.try_recv() {
        more += b.len();
    }
    assert!(more > 0 && more <= budget, "after credit: {more}");
}

#[test]
fn upstream_reset_after_head_resets_the_client_stream() {
    let mut p = Pair::new(64 * 1024);
    p.request("GET", "/big", true);
    let (_env, side) = p.take_request();
    side.edge.send(ToEdge::Headers {
        head: ResponseHead::new(http::StatusCode::OK),
        head_after: std::time::Duration::ZERO,
    });
    side.edge.send(ToEdge::Data(Bytes::from(vec![1u8; 1000])));
    p.deliver();
    let (status, body, _, _) = p.client_events();
    assert_eq!(status.as_deref(), Some("200"));
    assert_eq!(body.len(), 1000);
    side.edge.send(ToEdge::Reset {
        code: h3_code::INTERNAL_ERROR,
    });
    p.deliver();
    let (_, _body, fin, reset) = p.client_events();
    assert!(!fin, "a reset response must not end cleanly");
    assert_eq!(reset, Some(h3_code::INTERNAL_ERROR));
    p.route();
    assert!(side.cancelled());
}

#[test]
fn failure_before_head_becomes_a_status() {
    let mut p = Pair::new(64 * 1024);
    p.request("GET", "/", true);
    let (_env, side) = p.take_request();
    side.edge.send(ToEdge::Fail {
        status: 504,
        reason: "timeout".into(),
        retry_after: None,
    });
    p.deliver();
    let (status, body, fin, _) = p.client_events();
    assert_eq!(status.as_deref(), Some("504"));
    assert!(String::from_utf8_lossy(&body).contains("504"));
    assert!(fin);
}

#[test]
fn garbage_is_counted_not_fatal() {
    let mut p = Pair::new(64 * 1024);
    let from = p.client_addr;
    let to = p.server_addr;
    for junk in [&b""[..], b"\x00", b"\xff\xff\xff\xff", &[0x40u8; 30][..]] {
        let mut j = junk.to_vec();
        p.edge.handle_datagram(Instant::now(), &mut j, from, to);
    }
    // A datagram claiming source port 0 is dropped before quiche sees it.
    let mut initial = vec![0xc0u8; 1200];
    let from0 = SocketAddr::new(from.ip(), 0);
    assert_eq!(
        p.edge
            .handle_datagram(Instant::now(), &mut initial, from0, to),
        None
    );
    assert_eq!(p.edge.connections(), 1);
    p.request("GET", "/still-works", true);
    let (env, _side) = p.take_request();
    assert_eq!(env.path, "/still-works");
}

#[test]
fn pacing_holds_packets_until_their_time() {
    // 8 Mbit/s = 1 MB/s over a link with a 5 ms one-way delay (quiche's
    // BBR2 also caps its window at rate × RTT, so the RTT must be real).
    let rate = 1_000_000u64;
    let delay = std::time::Duration::from_millis(5);
    let n = 300_000usize;
    let mut p = Pair::with(1 << 20, |c| {
        // quiche 0.30 computes send times only in its BBR2 recovery.
        c.quic.cc = crate::config::CongestionControl::Bbr2;
        c.quic.pacing = true;
        c.quic.max_pacing_rate_mbps = rate * 8 / 1_000_000;
    });
    p.request("GET", "/paced", true);
    let (_env, side) = p.take_request();
    side.edge.send(ToEdge::Headers {
        head: ResponseHead::new(http::StatusCode::OK),
        head_after: std::time::Duration::ZERO,
    });
    side.edge.send(ToEdge::Data(Bytes::from(vec![7u8; n])));
    side.edge.send(ToEdge::End);
    while let Ok((k, m)) = p.rx.try_recv() {
        p.edge.handle_upstream(Instant::now(), k, m);
    }
    let start = Instant::now();
    let mut link: std::collections::VecDeque<(Instant, Vec<u8>, TransmitInfo)> = Default::default();
    let mut buf = vec![0u8; 65536];
    let (mut got, mut fin) = (0usize, false);
    let mut saw_hold = false;
    while !fin && start.elapsed() < std::time::Duration::from_secs(10) {
        let now = Instant::now();
        while let Ok((len, info)) = p.client.send(&mut buf) {
            p.edge
                .handle_datagram(now, &mut buf[..len], info.from, info.to);
        }
        if p.edge.poll_timeout().is_some_and(|t| t <= now) {
            p.edge.handle_timeout(now);
        }
        while let Some(t) = p.edge.poll_transmit(Instant::now(), &mut buf, 1) {
            link.push_back((now + delay, buf[..t.len].to_vec(), t));
        }
        // A held packet means nothing else leaves until the edge's timer.
        if p.edge.conns.iter().any(|(_, c)| c.held.is_some()) {
            saw_hold = true;
            assert!(p.edge.poll_transmit(Instant::now(), &mut buf, 1).is_none());
            assert!(p.edge.poll_timeout().is_some());
        }
        while link.front().is_some_and(|(at, _, _)| *at <= now) {
            let (_, mut pkt, t) = link.pop_front().unwrap();
            let info = quiche::RecvInfo {
                from: t.from,
                to: t.to,
            };
            let _ = p.client.recv(&mut pkt, info);
        }
        if p.client.timeout().is_some_and(|t| t.is_zero()) {
            p.client.on_timeout();
        }
        let (_, body, f, _) = p.client_events();
        got += body.len();
        fin = f;
        let next = [
            p.edge.poll_timeout(),
            link.front().map(|(at, _, _)| *at),
            p.client.timeout().map(|d| now + d),
        ]
        .into_iter()
        .flatten()
        .min()
        .unwrap_or(now + delay);
        std::thread::sleep(
            next.saturating_duration_since(Instant::now())
                .min(std::time::Duration::from_millis(2)),
        );
    }
    assert!(fin, "body did not finish: {got} of {n}");
    assert_eq!(got, n);
    assert!(saw_hold, "pacing never held a packet back");
    assert!(p.edge.metrics.paced.load(Ordering::Relaxed) > 0);
    let took = start.elapsed().as_secs_f64();
    let floor = n as f64 / rate as f64 * 0.5;
    assert!(
        took >= floor,
        "{n} bytes at {rate} B/s took only {took:.3}s"
    );
}

#[test]
fn without_pacing_nothing_is_held() {
    let mut p = Pair::with(1 << 20, |c| {
        c.quic.cc = crate::config::CongestionControl::Bbr2;
        c.quic.pacing = false;
        c.quic.max_pacing_rate_mbps = 8;
    });
    p.request("GET", "/burst", true);
    let (_env, side) = p.take_request();
    side.edge.send(ToEdge::Headers {
        head: ResponseHead::new(http::StatusCode::OK),
        head_after: std::time::Duration::ZERO,
    });
    side.edge
        .send(ToEdge::Data(Bytes::from(vec![7u8; 300_000])));
    side.edge.send(ToEdge::End);
    p.deliver();
    let mut got = 0;
    let mut fin = false;
    for _ in 0..100 {
        p.exchange();
        let (_, body, f, _) = p.client_events();
        got += body.len();
        fin |= f;
        if fin {
            break;
        }
    }
    assert!(fin && got == 300_000, "got {got}, fin {fin}");
    assert_eq!(p.edge.metrics.paced.load(Ordering::Relaxed), 0);
}

impl Pair {
    /// Opens a GET stream and resets it, each in its own datagram, and feeds
    /// both to the edge before anything is drained from it: as a rapid-reset
    /// client's HEADERS and RESET_STREAM arrive in one receive batch.
    fn open_and_reset(&mut self) {
        let sid = self.send_get();
        let _ =
            self.client
                .stream_shutdown(sid, quiche::Shutdown::Read, h3_code::REQUEST_CANCELLED);
        let _ =
            self.client
                .stream_shutdown(sid, quiche::Shutdown::Write, h3_code::REQUEST_CANCELLED);
        self.client_to_edge();
    }

    /// Delivers what the client has to send, without draining the edge.
    fn client_to_edge(&mut self) {
        let mut buf = vec![0u8; 65536];
        while let Ok((n, info)) = self.client.send(&mut buf) {
            self.edge
                .handle_datagram(Instant::now(), &mut buf[..n], info.from, info.to);
        }
    }
}

#[test]
fn a_request_reset_before_dispatch_is_never_handed_upstream() {
    let mut p = Pair::new(64 * 1024);
    p.open_and_reset();
    assert!(
        p.edge.poll_event().is_none(),
        "reset request was dispatched"
    );
    assert_eq!(
        p.edge
            .metrics
            .cancelled_before_dispatch
            .load(Ordering::Relaxed),
        1
    );
    assert_eq!(p.edge.requests_in_flight(), 0);
    // The connection still serves requests.
    p.exchange();
    p.request("GET", "/after", true);
    let (env, _side) = p.take_request();
    assert_eq!(env.path, "/after");
}

#[test]
fn a_source_past_its_abandoned_stream_limit_is_closed_and_refused() {
    let mut p = Pair::with(64 * 1024, |c| c.limits.max_abandoned_streams_per_source = 3);
    for _ in 0..3 {
        p.open_and_reset();
        p.exchange();
        assert!(p.client.peer_error().is_none(), "closed too early");
    }
    p.open_and_reset();
    p.exchange();
    let err = p.client.peer_error().expect("connection closed");
    assert_eq!(err.error_code, h3_code::EXCESSIVE_LOAD);
    assert!(err.is_app);
    assert_eq!(
        p.edge
            .metrics
            .abandoned_stream_closes
            .load(Ordering::Relaxed),
        1
    );
    // Reconnecting from the same address gets nowhere: its Initials are
    // dropped before any handshake work, until the window ends.
    let same_ip: SocketAddr = "127.0.0.1:5001".parse().unwrap();
    assert!(!p.reconnect(8, same_ip), "an over-limit source was let in");
    let refused = p.edge.metrics.dropped_count(DropReason::AbandonedStreams);
    assert!(refused >= 1, "refused Initials are counted ({refused})");
    // Another source is served as usual.
    let other_ip: SocketAddr = "127.0.0.2:5000".parse().unwrap();
    assert!(p.reconnect(9, other_ip), "an innocent source was refused");
}

#[test]
fn a_connection_past_its_abandoned_stream_limit_is_closed_with_excessive_load() {
    let mut p = Pair::with(64 * 1024, |c| {
        c.limits.max_abandoned_streams_per_connection = 2;
    });
    p.open_and_reset();
    p.exchange();
    assert!(p.client.peer_error().is_none(), "closed too early");
    p.open_and_reset();
    p.exchange();
    let err = p.client.peer_error().expect("connection closed");
    assert_eq!(err.error_code, h3_code::EXCESSIVE_LOAD);
    // The per-connection limit alone does not bar the address.
    assert!(p.reconnect(8, "127.0.0.1:5001".parse().unwrap()));
}

/// Under a lossy link (every 4th server packet dropped) the loss and
/// retransmission counters move, and a client close is counted by reason
/// once the connection is reaped.
#[test]
fn loss_counters_move_under_a_lossy_link() {
    use std::sync::atomic::Ordering::Relaxed;
    let mut p = Pair::new(64 * 1024);
    p.request("GET", "/big", true);
    let (_env, side) = p.take_request();
    side.edge.send(ToEdge::Headers {
        head: ResponseHead::new(http::StatusCode::OK),
        head_after: std::time::Duration::ZERO,
    });
    for _ in 0..64 {
        side.edge.send(ToEdge::Data(Bytes::from(vec![7u8; 4096])));
    }
    side.edge.send(ToEdge::End);
    while let Ok((k, m)) = p.rx.try_recv() {
        p.edge.handle_upstream(Instant::now(), k, m);
    }
    let mut buf = vec![0u8; 65536];
    let mut sent = 0u64;
    let deadline = Instant::now() + std::time::Duration::from_secs(10);
    let mut received = 0usize;
    while received < 64 * 4096 && Instant::now() < deadline {
        while let Some(t) = p.edge.poll_transmit(Instant::now(), &mut buf, 1) {
            sent += 1;
            if sent % 4 == 0 {
                continue; // lost on the way
            }
            let info = quiche::RecvInfo {
                from: t.from,
                to: t.to,
            };
            let _ = p.client.recv(&mut buf[..t.len], info);
        }
        while let Ok((n, info)) = p.client.send(&mut buf) {
            p.edge
                .handle_datagram(Instant::now(), &mut buf[..n], info.from, info.to);
        }
        received += p.client_events().1.len();
        std::thread::sleep(std::time::Duration::from_millis(1));
        p.client.on_timeout();
        p.edge.handle_timeout(Instant::now());
    }
    assert_eq!(
        received,
        64 * 4096,
        "response did not complete over the lossy link"
    );
    p.client.close(true, 0x100, b"done").unwrap();
    let deadline = Instant::now() + std::time::Duration::from_secs(5);
    while p.edge.connections() > 0 && Instant::now() < deadline {
        p.exchange();
        std::thread::sleep(std::time::Duration::from_millis(5));
        p.edge.handle_timeout(Instant::now());
    }
    assert_eq!(p.edge.connections(), 0, "connection not reaped");
    let obs = &p.edge.metrics.obs;
    assert!(obs.packets_lost.load(Relaxed) > 0, "no loss counted");
    assert!(
        obs.packets_retransmitted.load(Relaxed) > 0,
        "no retransmission counted"
    );
    assert!(obs.packets_sent.load(Relaxed) >= sent / 2);
    let peer_closed = crate::telemetry::probes::CloseReason::ALL
        .iter()
        .position(|r| *r == crate::telemetry::probes::CloseReason::PeerClosed)
        .unwrap();
    assert_eq!(obs.closed_by_reason[peer_closed].load(Relaxed), 1);
    assert_eq!(obs.handshake_duration.count(), 1);
}

#[test]
fn round_robin_takes_at_most_the_limit_and_resumes_where_it_stopped() {
    let occupied = |k: usize| k % 2 == 1; // slots 1, 3, 5, 7, 9 of 10
    let mut seen = Vec::new();
    let mut visit = |k: usize| {
        let hit = occupied(k);
        if hit {
            seen.push(k);
        }
        hit
    };
    let next = round_robin(10, 0, 2, &mut visit);
    assert_eq!(next, 4);
    let next = round_robin(10, next, 2, &mut visit);
    assert_eq!(next, 8);
    // Wraps around to the start.
    let next = round_robin(10, next, 2, &mut visit);
    assert_eq!(next, 2);
    assert_eq!(seen, vec![1, 3, 5, 7, 9, 1]);
    // Nothing to take: one full pass, back where it began.
    assert_eq!(round_robin(10, 3, 5, |_| false), 3);
    assert_eq!(round_robin(0, 3, 5, |_| true), 0);
}

/// While a response is still on its way, `sample_paths` records the open
/// connection's congestion window and RTT.
#[test]
fn open_connections_are_sampled_mid_download() {
    let mut p = Pair::new(64 * 1024);
    p.request("GET", "/big", true);
    let (_env, side) = p.take_request();
    side.edge.send(ToEdge::Headers {
        head: ResponseHead::new(http::StatusCode::OK),
        head_after: std::time::Duration::ZERO,
    });
    side.edge
        .send(ToEdge::Data(Bytes::from(vec![7u8; 32 * 1024])));
    p.deliver();
    assert_eq!(p.edge.requests_in_flight(), 1, "response already complete");
    let obs = &p.edge.metrics.obs;
    assert_eq!(obs.cwnd_sampled.count(), 0);
    assert_eq!(p.edge.sample_paths(), 1);
    assert_eq!(p.edge.sample_paths(), 1);
    let obs = &p.edge.metrics.obs;
    assert_eq!(obs.cwnd_sampled.count(), 2);
    assert_eq!(obs.rtt_sampled.count(), 2);
    let mut sum =
        crate::telemetry::AtomicHistogram::<crate::telemetry::signals::CwndBuckets>::empty_sum();
    obs.cwnd_sampled.add_to(&mut sum);
    assert!(sum.sum() > 0.0, "cwnd sampled as 0");
    side.edge.send(ToEdge::End);
    p.deliver();
}

/// The access log line names the connection by the CID the client sends
/// to, the client's port, and the upstream time the head event carried.
#[test]
fn access_line_names_the_connection_and_the_upstream_time() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("access.log");
    let (log, guard) = crate::telemetry::access::AccessLog::start(Some(&path)).unwrap();
    let mut p = Pair::new(64 * 1024);
    p.edge.set_access_log(log.sink());
    p.request("GET", "/logged", true);
    let (_env, side) = p.take_request();
    side.edge.send(ToEdge::Backend {
        upstream: "app".into(),
        backend: "127.0.0.1:9001".parse().unwrap(),
    });
    side.edge.send(ToEdge::Headers {
        head: ResponseHead::new(http::StatusCode::OK),
        head_after: std::time::Duration::from_micros(1500),
    });
    side.edge.send(ToEdge::Data(Bytes::from_static(b"hello")));
    side.edge.send(ToEdge::End);
    p.deliver();
    assert_eq!(p.edge.requests_in_flight(), 0);
    drop(guard); // flushes
    let text = std::fs::read_to_string(&path).unwrap();
    assert_eq!(text.lines().count(), 1, "{text}");
    let v: serde_json::Value = serde_json::from_str(text.trim_end()).unwrap();
    let cid = hex::encode(p.client.destination_id().as_ref());
    assert_eq!(v["conn_id"], cid.as_str(), "{v}");
    assert_eq!(v["client_port"], p.client_addr.port(), "{v}");
    assert_eq!(v["path"], "/logged");
    assert_eq!(v["backend"], "127.0.0.1:9001");
    assert_eq!(v["status"], 200);
    assert_eq!(v["bytes_out"], 5);
    assert_eq!(v["upstream_ms"], 1.5);
    assert_eq!(v["outcome"], "ok");
}

/// A head, its whole body and FIN in one receive batch: the body waits in
/// quiche until the head is mapped (`poll_event`), then all of it and the
/// end reach the upstream side with no further packet from the client.
#[test]
fn a_body_that_came_with_its_head_is_forwarded_to_the_end() {
    let mut p = Pair::new(64 * 1024);
    let hdrs = request_fields("POST", "/upload");
    let h3c = p.h3.as_mut().unwrap();
    let sid = h3c.send_request(&mut p.client, &hdrs, false).unwrap();
    let sent = h3c
        .send_body(&mut p.client, sid, &[7u8; 500], true)
        .unwrap();
    assert_eq!(sent, 500);
    p.client_to_edge();
    let (env, mut side) = p.take_request();
    assert_eq!(env.path, "/upload");
    let (mut got, mut ended) = (0, false);
    while let Ok(m) = side.body.try_recv() {
        match m {
            ToUpstream::Data(b) => got += b.len(),
            ToUpstream::End => ended = true,
            ToUpstream::Trailers(_) => {}
        }
    }
    assert_eq!((got, ended), (500, true), "body bytes and end forwarded");
}

/// HEADERS, then trailers, then FIN, no DATA, all before the head is
/// mapped: the trailers reach the upstream side ahead of the end, instead
/// of being dropped for want of a body channel.
#[test]
fn trailers_that_come_before_dispatch_reach_the_upstream_side() {
    let mut p = Pair::new(64 * 1024);
    let hdrs = request_fields("POST", "/upload");
    let h3c = p.h3.as_mut().unwrap();
    let sid = h3c.send_request(&mut p.client, &hdrs, false).unwrap();
    let trailers = [h3::Header::new(b"x-checksum", b"abc")];
    h3c.send_additional_headers(&mut p.client, sid, &trailers, true, true)
        .unwrap();
    p.client_to_edge();
    let (env, mut side) = p.take_request();
    assert!(env.has_body, "a request with trailers has a body section");
    let mut got = Vec::new();
    while let Ok(m) = side.body.try_recv() {
        got.push(match m {
            ToUpstream::Data(b) => format!("data {}", b.len()),
            ToUpstream::Trailers(t) => format!(
                "trailers x-checksum={}",
                t.get("x-checksum")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("-")
            ),
            ToUpstream::End => "end".into(),
        });
    }
    assert_eq!(
        got.first().map(String::as_str),
        Some("trailers x-checksum=abc"),
        "upstream side saw {got:?}"
    );
}

impl Pair {
    /// Sends a GET from the client, one datagram, without draining the edge.
    fn send_get(&mut self) -> u64 {
        let hdrs = request_fields("GET", "/");
        let h3c = self.h3.as_mut().unwrap();
        let sid = h3c.send_request(&mut self.client, &hdrs, true).unwrap();
        self.client_to_edge();
        sid
    }

    /// Delivers every datagram the edge has to the client; how many.
    fn edge_to_client(&mut self) -> usize {
        let mut buf = vec![0u8; 65536];
        let mut n = 0;
        while let Some(t) = self.edge.poll_transmit(Instant::now(), &mut buf, 1) {
            let info = quiche::RecvInfo {
                from: t.from,
                to: t.to,
            };
            let _ = self.client.recv(&mut buf[..t.len], info);
            n += 1;
        }
        n
    }

    fn client_in_flight(&self) -> usize {
        self.client.path_stats().next().unwrap().bytes_in_flight
    }
}

#[test]
fn the_ack_of_a_request_rides_with_its_response() {
    let mut p = Pair::new(64 * 1024);
    p.exchange();
    p.send_get();
    assert_eq!(
        p.edge_to_client(),
        0,
        "no lone ACK while the response is due"
    );
    assert!(p.client_in_flight() > 0);
    let (_env, side) = p.take_request();
    assert_eq!(
        answer_ok(&mut p, &side),
        1,
        "response and ACK in one datagram"
    );
    assert_eq!(
        p.client_in_flight(),
        0,
        "the request packet is acknowledged"
    );
    let (status, body, fin, _) = p.client_events();
    assert_eq!(
        (status.as_deref(), &body[..], fin),
        (Some("200"), &b"ok"[..], true)
    );
}

#[test]
fn a_held_ack_goes_out_alone_when_no_response_comes_in_time() {
    let mut p = Pair::new(64 * 1024);
    p.exchange();
    p.send_get();
    assert_eq!(p.edge_to_client(), 0);
    let _request = p.take_request();
    let at = p.edge.poll_timeout().expect("the hold's timer");
    assert!(at <= Instant::now() + ACK_HOLD);
    std::thread::sleep(ACK_HOLD + std::time::Duration::from_millis(1));
    p.edge.handle_timeout(Instant::now());
    assert_eq!(p.edge_to_client(), 1, "the ACK, alone");
    assert_eq!(p.client_in_flight(), 0);
}

#[test]
fn a_second_packet_owed_is_acknowledged_at_once() {
    let mut p = Pair::new(64 * 1024);
    p.exchange();
    p.send_get();
    p.send_get();
    assert_eq!(
        p.edge_to_client(),
        1,
        "RFC 9000 §13.2.2: every second packet"
    );
    assert_eq!(p.client_in_flight(), 0);
}

/// Answers the request taken from `side` with a 200 and `ok`, and
/// delivers the answer to the client; how many datagrams that took.
fn answer_ok(p: &mut Pair, side: &UpstreamSide) -> usize {
    side.edge.send(ToEdge::Headers {
        head: ResponseHead::new(http::StatusCode::OK),
        head_after: std::time::Duration::ZERO,
    });
    side.edge.send(ToEdge::Data(Bytes::from_static(b"ok")));
    side.edge.send(ToEdge::End);
    while let Ok((k, m)) = p.rx.try_recv() {
        p.edge.handle_upstream(Instant::now(), k, m);
    }
    p.edge_to_client()
}

#[test]
fn a_connection_gives_back_its_buffers_once_quiet_for_idle_shrink() {
    let mut p = Pair::new(64 * 1024);
    p.exchange();
    p.send_get();
    let (_env, side) = p.take_request();
    let asked = Instant::now();
    answer_ok(&mut p, &side);
    let ci = p.edge.conns.iter().next().map(|(ci, _)| ci).unwrap();
    let at = p.edge.conns[ci]
        .shrink_at
        .expect("due once the last request ended");
    assert!(at >= asked + IDLE_SHRINK && at <= Instant::now() + IDLE_SHRINK);
    assert!(p.edge.poll_timeout().is_some_and(|t| t <= at));
    // A new request puts it off: the connection is busy again.
    p.send_get();
    let (_env, side) = p.take_request();
    assert_eq!(p.edge.conns[ci].shrink_at, None);
    answer_ok(&mut p, &side);
    let at = p.edge.conns[ci].shrink_at.expect("due again");
    p.edge.handle_timeout(at);
    assert_eq!(p.edge.conns[ci].shrink_at, None, "done, and not again");
    // The connection works as before.
    p.send_get();
    let (_env, side) = p.take_request();
    answer_ok(&mut p, &side);
    let (status, body, fin, _) = p.client_events();
    assert_eq!(
        (status.as_deref(), &body[..], fin),
        (Some("200"), &b"okokok"[..], true)
    );
}

/// The start of a 1-RTT packet from the edge to the client, as an ICMP
/// message would quote it: flags, then the client's connection id.
fn quoted_short_packet(p: &Pair) -> Vec<u8> {
    let mut q = vec![0x41];
    q.extend_from_slice(p.client.source_id().as_ref());
    q.extend_from_slice(&[0x17; 8]);
    q
}

#[test]
fn icmp_unreachable_counts_only_when_it_quotes_the_connection() {
    use spooky_uring::errqueue::Unreachable;
    let mut p = Pair::new(64 * 1024);
    let now = Instant::now();
    let q = quoted_short_packet(&p);
    let mut forged = q.clone();
    forged[3] ^= 0xff;
    let other_port = SocketAddr::new(p.client_addr.ip(), p.client_addr.port() + 1);
    let reports = [
        Unreachable::new(p.client_addr, libc::ECONNREFUSED, &forged),
        Unreachable::new(other_port, libc::ECONNREFUSED, &q),
        Unreachable::new(p.client_addr, libc::ECONNREFUSED, &q[..3]),
    ];
    let unmatched = p.edge.handle_unreachable(now, &reports);
    assert_eq!(
        unmatched,
        reports.to_vec(),
        "a wrong CID, port or a short quote"
    );
    let ci = p.edge.conns.iter().next().map(|(ci, _)| ci).unwrap();
    assert_eq!(p.edge.conns[ci].unreachable_at, None);

    let report = Unreachable::new(p.client_addr, libc::ECONNREFUSED, &q);
    assert!(p.edge.handle_unreachable(now, &[report]).is_empty());
    assert_eq!(
        p.edge.conns[ci].unreachable_at,
        Some(now + UNREACHABLE_GRACE)
    );
    // A packet from the client: it is there after all.
    p.send_get();
    assert_eq!(p.edge.conns[ci].unreachable_at, None);
    let (_env, side) = p.take_request();

    // Silent through the grace: the connection goes, its request with it.
    assert!(p.edge.handle_unreachable(now, &[report]).is_empty());
    p.edge.handle_timeout(now + UNREACHABLE_GRACE);
    assert_eq!(p.edge.connections(), 0);
    assert_eq!(p.edge.requests_in_flight(), 0);
    p.route();
    assert!(side.cancelled(), "the backend stream is reset");
    assert_eq!(p.edge.metrics.unreachable_closes.load(Ordering::Relaxed), 1);
}
