//! A stateful target: one sans-IO `Edge` driven through an arbitrary
//! sequence of inputs, as a worker would drive it, with a real quiche
//! HTTP/3 client on the other side so that the sequence gets past the
//! handshake into requests, bodies, resets, migration and shutdown.
//!
//! Each step is one of: a client packet delivered (or mutated, truncated,
//! duplicated), an edge packet delivered to the client (or lost), a raw
//! datagram (garbage, or carrying a CID the edge issued), time advancing on
//! the fake clock (`handle_timeout`), a request or body or reset from the
//! client, an upstream event for a request the edge handed out, a NAT
//! rebinding of the client, a fresh client connection, a graceful or forced
//! shutdown.
//!
//! Properties beyond "no panic", after every step:
//! * the edge sends only to addresses that sent to it, from the address it
//!   listens on, within the caller's buffer;
//! * its gauges agree with its tables (`spooky_quic_connections_active` and
//!   `spooky_requests_in_flight` against `connections()` and
//!   `requests_in_flight()`).
#![no_main]

use std::collections::{HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use arbitrary::Arbitrary;
use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use quiche::h3;
use spooky::edge::EdgeEvent;
use spooky::router::bridge::{RequestEvent, RequestKey, ToEdge, ToUpstream};
use spooky_fuzz::{
    config, edge, EdgeKnobs, EdgeUnderTest, MAX_SEGMENTS, SERVER_ADDR, TRANSMIT_BUF,
};

/// Steps one input runs (keeps an execution in the milliseconds).
const MAX_STEPS: usize = 96;
/// Handshake rounds tried when the input asks to start connected.
const HANDSHAKE_ROUNDS: usize = 16;
/// Fields one request or response carries at most.
const MAX_FIELDS: usize = 16;
/// Largest body chunk one step sends.
const MAX_CHUNK: usize = 4096;

#[derive(Debug, Arbitrary)]
struct Input {
    /// Complete a clean handshake before the steps, so they start deep.
    connect_first: bool,
    retry: bool,
    steps: Vec<Step>,
}

#[derive(Debug, Arbitrary)]
enum Step {
    /// Deliver the client's next packet to the edge, maybe altered.
    ClientPacket(Mutation),
    /// Deliver the edge's next train to the client, or lose it.
    EdgeTrain { lose: bool },
    /// Move packets both ways until both sides are quiet.
    Exchange,
    /// A datagram of arbitrary bytes; with `known_cid`, its DCID is one the
    /// edge issued (short header), so it reaches quiche for a live connection.
    Raw { known_cid: bool, bytes: Vec<u8> },
    /// The fake clock advances; expired timers fire.
    Advance { ms: u16 },
    /// The client opens a request stream with these fields.
    Request {
        fields: Vec<(Vec<u8>, Vec<u8>)>,
        valid_head: bool,
        fin: bool,
    },
    /// Request body on one of the client's open streams.
    Body {
        stream: u8,
        data: Vec<u8>,
        fin: bool,
    },
    /// The client resets or stops one of its streams.
    Cancel { stream: u8, stop_sending: bool },
    /// The upstream task of one handed-out request acts.
    Upstream { request: u8, action: Upstream },
    /// The client's address changes (NAT rebinding) to this port.
    Rebind { port: u16 },
    /// The client closes its connection.
    ClientClose,
    /// A new client connection replaces the current one.
    NewClient,
    /// Graceful drain (GOAWAY), then a forced close when `force`.
    Shutdown { force: bool },
    /// An ICMP unreachable report, about the client's address and quoting
    /// its connection id when `about_client`, else about some other port
    /// with arbitrary quoted bytes.
    Unreachable { about_client: bool, quoted: Vec<u8> },
}

#[derive(Debug, Arbitrary)]
enum Mutation {
    None,
    Flip { at: u16, xor: u8 },
    Truncate { to: u16 },
    Duplicate,
}

#[derive(Debug, Arbitrary)]
enum Upstream {
    Head {
        status: u16,
        fields: Vec<(Vec<u8>, Vec<u8>)>,
    },
    Data {
        len: u16,
    },
    Trailers {
        fields: Vec<(Vec<u8>, Vec<u8>)>,
    },
    End,
    Fail {
        status: u16,
    },
    Reset {
        code: u16,
    },
    /// Return the request-body permits the edge lent (as h2 would).
    Credit,
    /// The upstream task goes away without a word.
    Vanish,
}

/// Linux's errno for an ICMP port unreachable (what the kernel reports).
const ECONNREFUSED: i32 = 111;

/// The client side: a quiche connection plus its HTTP/3 layer once up.
struct Client {
    quic: quiche::Connection,
    h3: Option<h3::Connection>,
    /// Where its packets appear to come from (changes on rebinding).
    from: SocketAddr,
    /// Its real local address (what quiche thinks).
    local: SocketAddr,
    streams: Vec<u64>,
}

/// One request as the fuzzer's request path sees it.
struct Side {
    key: RequestKey,
    /// Body bytes the edge forwarded that no credit was returned for yet.
    body_bytes: usize,
}

struct Harness {
    e: EdgeUnderTest,
    client: Client,
    clients_made: u16,
    /// Every address that sent the edge a datagram.
    senders: HashSet<SocketAddr>,
    /// Requests the edge handed out (the fuzzer plays the request path).
    sides: VecDeque<Side>,
    /// Response events for the edge, applied at the next `service`.
    to_edge: VecDeque<(RequestKey, ToEdge)>,
    /// The fake clock: advanced only by `Step::Advance`.
    now: Instant,
    out: Vec<u8>,
    /// CIDs the edge issued, read from the DCID of packets it sent.
    issued: Vec<Vec<u8>>,
}

fuzz_target!(|input: Input| {
    let knobs = EdgeKnobs {
        retry: input.retry,
        server_id: 1,
        max_connections: 64,
    };
    let mut h = Harness::new(knobs);
    if input.connect_first {
        h.handshake();
    }
    for step in input.steps.iter().take(MAX_STEPS) {
        h.step(step);
        h.service();
        h.check();
    }
});

fn client_config() -> quiche::Config {
    // Constant settings that quiche accepts; a failure is a quiche change
    // every input would hit.
    #[allow(clippy::expect_used)]
    let mut c = quiche::Config::new(quiche::PROTOCOL_VERSION).expect("client config");
    c.verify_peer(false);
    let _ = c.set_application_protos(&[b"h3"]);
    c.set_initial_max_data(1 << 20);
    c.set_initial_max_stream_data_bidi_local(256 << 10);
    c.set_initial_max_stream_data_bidi_remote(256 << 10);
    c.set_initial_max_stream_data_uni(256 << 10);
    c.set_initial_max_streams_bidi(64);
    c.set_initial_max_streams_uni(16);
    c.set_max_idle_timeout(5000);
    c
}

fn new_client(n: u16) -> Client {
    let local = SocketAddr::from(([127, 0, 0, 1], 5000u16.wrapping_add(n).max(1)));
    let mut scid = [7u8; 16];
    scid[..2].copy_from_slice(&n.to_be_bytes());
    let scid = quiche::ConnectionId::from_vec(scid.to_vec());
    #[allow(clippy::expect_used)]
    let quic = quiche::connect(
        Some("localhost"),
        &scid,
        local,
        SERVER_ADDR,
        &mut client_config(),
    )
    .expect("client connect");
    Client {
        quic,
        h3: None,
        from: local,
        local,
        streams: Vec::new(),
    }
}

fn fields(list: &[(Vec<u8>, Vec<u8>)]) -> Vec<h3::Header> {
    list.iter()
        .take(MAX_FIELDS)
        .map(|(n, v)| h3::Header::new(n, v))
        .collect()
}

impl Harness {
    fn new(knobs: EdgeKnobs) -> Self {
        let now = Instant::now();
        Harness {
            e: edge(&config(knobs), 0),
            client: new_client(0),
            clients_made: 1,
            senders: HashSet::new(),
            sides: VecDeque::new(),
            to_edge: VecDeque::new(),
            now,
            out: vec![0u8; TRANSMIT_BUF],
            issued: Vec::new(),
        }
    }

    fn handshake(&mut self) {
        for _ in 0..HANDSHAKE_ROUNDS {
            self.exchange();
            if self.client.quic.is_established() {
                break;
            }
        }
        self.client_h3();
    }

    fn client_h3(&mut self) {
        if self.client.h3.is_none() && self.client.quic.is_established() {
            if let Ok(cfg) = h3::Config::new() {
                self.client.h3 = h3::Connection::with_transport(&mut self.client.quic, &cfg).ok();
            }
        }
    }

    fn deliver(&mut self, buf: &mut [u8]) {
        let from = self.client.from;
        self.senders.insert(from);
        let _ = self
            .e
            .edge
            .handle_datagram(self.now, buf, from, SERVER_ADDR);
    }

    /// One client packet to the edge; false when the client had none.
    fn client_packet(&mut self, m: &Mutation) -> bool {
        let mut buf = vec![0u8; 1500];
        let Ok((n, _)) = self.client.quic.send(&mut buf) else {
            return false;
        };
        buf.truncate(n);
        match *m {
            Mutation::None => self.deliver(&mut buf),
            Mutation::Flip { at, xor } => {
                if !buf.is_empty() {
                    let i = usize::from(at) % buf.len();
                    buf[i] ^= xor;
                }
                self.deliver(&mut buf);
            }
            Mutation::Truncate { to } => {
                buf.truncate(usize::from(to) % (n + 1));
                self.deliver(&mut buf);
            }
            Mutation::Duplicate => {
                let mut again = buf.clone();
                self.deliver(&mut buf);
                self.deliver(&mut again);
            }
        }
        true
    }

    /// One train from the edge, checked, and delivered unless lost; false
    /// when the edge had nothing to send.
    fn edge_train(&mut self, lose: bool) -> bool {
        let Some(t) = self
            .e
            .edge
            .poll_transmit(Instant::now(), &mut self.out, MAX_SEGMENTS)
        else {
            return false;
        };
        assert!(t.len <= self.out.len(), "train longer than the buffer");
        assert!(t.segment_size > 0, "zero segment size");
        assert!(
            t.len <= t.segment_size * MAX_SEGMENTS,
            "train of more than {MAX_SEGMENTS} segments"
        );
        assert_eq!(t.from, SERVER_ADDR, "sent from an address not listened on");
        assert!(
            self.senders.contains(&t.to),
            "sent to {} which never sent anything",
            t.to
        );
        let mut off = 0;
        while off < t.len {
            let end = (off + t.segment_size).min(t.len);
            let seg = &mut self.out[off..end];
            if !lose && t.to == self.client.from {
                let info = quiche::RecvInfo {
                    from: SERVER_ADDR,
                    to: self.client.local,
                };
                let _ = self.client.quic.recv(seg, info);
            }
            off = end;
        }
        true
    }

    fn exchange(&mut self) {
        for _ in 0..64 {
            let mut moved = false;
            while self.client_packet(&Mutation::None) {
                moved = true;
            }
            while self.edge_train(false) {
                moved = true;
            }
            if !moved {
                break;
            }
        }
        self.learn_cids();
    }

    /// CIDs the edge issued, as the client now addresses it.
    fn learn_cids(&mut self) {
        let dcid = self.client.quic.destination_id().to_vec();
        if dcid.len() == spooky::edge::cid::CID_LEN && !self.issued.contains(&dcid) {
            self.issued.push(dcid);
        }
    }

    fn step(&mut self, step: &Step) {
        match step {
            Step::ClientPacket(m) => {
                self.client_packet(m);
            }
            Step::EdgeTrain { lose } => {
                self.edge_train(*lose);
            }
            Step::Exchange => self.exchange(),
            Step::Raw { known_cid, bytes } => self.raw(*known_cid, bytes),
            Step::Advance { ms } => {
                self.now += Duration::from_millis(u64::from(*ms));
                self.client.quic.on_timeout();
            }
            Step::Request {
                fields: f,
                valid_head,
                fin,
            } => self.request(f, *valid_head, *fin),
            Step::Body { stream, data, fin } => {
                let Some(&sid) = self.pick_stream(*stream) else {
                    return;
                };
                if let Some(h3c) = self.client.h3.as_mut() {
                    let data = &data[..data.len().min(MAX_CHUNK)];
                    let _ = h3c.send_body(&mut self.client.quic, sid, data, *fin);
                }
            }
            Step::Cancel {
                stream,
                stop_sending,
            } => {
                let Some(&sid) = self.pick_stream(*stream) else {
                    return;
                };
                let dir = if *stop_sending {
                    quiche::Shutdown::Read
                } else {
                    quiche::Shutdown::Write
                };
                let _ = self.client.quic.stream_shutdown(sid, dir, 0x10c);
            }
            Step::Upstream { request, action } => self.upstream(*request, action),
            Step::Rebind { port } => {
                self.client.from = SocketAddr::from(([127, 0, 0, 2], (*port).max(1)));
            }
            Step::ClientClose => {
                let _ = self.client.quic.close(true, 0x100, b"bye");
            }
            Step::NewClient => {
                self.client = new_client(self.clients_made);
                self.clients_made = self.clients_made.wrapping_add(1);
            }
            Step::Shutdown { force } => {
                self.e.edge.close_all(self.now);
                if *force {
                    self.e.edge.force_close_all();
                }
                assert!(self.e.edge.is_draining());
            }
            Step::Unreachable {
                about_client,
                quoted,
            } => self.unreachable(*about_client, quoted),
        }
    }

    fn unreachable(&mut self, about_client: bool, quoted: &[u8]) {
        let (peer, q) = if about_client {
            let mut q = vec![0x41];
            q.extend_from_slice(self.client.quic.source_id().as_ref());
            q.extend_from_slice(quoted);
            (self.client.from, q)
        } else {
            let port = self.client.from.port().wrapping_add(1).max(1);
            (
                SocketAddr::new(self.client.from.ip(), port),
                quoted.to_vec(),
            )
        };
        let report = spooky_uring::errqueue::Unreachable::new(peer, ECONNREFUSED, &q);
        let unmatched = self.e.edge.handle_unreachable(self.now, &[report]);
        assert!(unmatched.len() <= 1);
        if !about_client {
            assert_eq!(unmatched.len(), 1, "a report about another port matched");
        }
    }

    fn pick_stream(&self, i: u8) -> Option<&u64> {
        let n = self.client.streams.len();
        (n > 0).then(|| &self.client.streams[usize::from(i) % n])
    }

    fn raw(&mut self, known_cid: bool, bytes: &[u8]) {
        let mut buf = bytes.to_vec();
        if known_cid {
            if let Some(cid) = self.issued.first().cloned() {
                if buf.len() < 1 + cid.len() {
                    buf.resize(1 + cid.len(), 0);
                }
                // Short header: fixed bit set, form bit clear.
                buf[0] = (buf[0] & 0x3f) | 0x40;
                buf[1..1 + cid.len()].copy_from_slice(&cid);
            }
        }
        self.deliver(&mut buf);
    }

    fn request(&mut self, f: &[(Vec<u8>, Vec<u8>)], valid_head: bool, fin: bool) {
        self.client_h3();
        let Some(h3c) = self.client.h3.as_mut() else {
            return;
        };
        let mut list = if valid_head {
            vec![
                h3::Header::new(b":method", if fin { b"GET" } else { b"POST" }),
                h3::Header::new(b":scheme", b"https"),
                h3::Header::new(b":authority", b"localhost"),
                h3::Header::new(b":path", b"/"),
            ]
        } else {
            Vec::new()
        };
        list.extend(fields(f));
        if let Ok(sid) = h3c.send_request(&mut self.client.quic, &list, fin) {
            self.client.streams.push(sid);
        }
    }

    fn upstream(&mut self, i: u8, action: &Upstream) {
        let n = self.sides.len();
        if n == 0 {
            return;
        }
        let idx = usize::from(i) % n;
        let msg = match action {
            Upstream::Head { status, fields: f } => {
                // What h2 can hand over: a valid status and valid fields.
                let status = http::StatusCode::from_u16(*status.clamp(&100, &999))
                    .unwrap_or(http::StatusCode::OK);
                let mut headers = http::HeaderMap::new();
                for (n, v) in f.iter().take(MAX_FIELDS) {
                    if let (Ok(n), Ok(v)) = (
                        http::HeaderName::from_bytes(n),
                        http::HeaderValue::from_bytes(v),
                    ) {
                        headers.append(n, v);
                    }
                }
                ToEdge::Headers {
                    head: spooky::router::ResponseHead::from_h2(status, headers),
                    head_after: std::time::Duration::ZERO,
                }
            }
            Upstream::Data { len } => {
                ToEdge::Data(Bytes::from(vec![0x61; usize::from(*len).min(MAX_CHUNK)]))
            }
            Upstream::Trailers { fields: f } => ToEdge::Trailers(fields(f)),
            Upstream::End => ToEdge::End,
            Upstream::Fail { status } => ToEdge::Fail {
                status: *status,
                reason: "fuzz".into(),
                retry_after: None,
            },
            Upstream::Reset { code } => ToEdge::Reset {
                code: u64::from(*code),
            },
            Upstream::Credit => {
                // Take the body the edge forwarded and give its credit back.
                ToEdge::RequestCredit(std::mem::take(&mut self.sides[idx].body_bytes))
            }
            Upstream::Vanish => {
                self.sides.remove(idx);
                return;
            }
        };
        self.to_edge.push_back((self.sides[idx].key, msg));
    }

    /// What a worker does after every input: take upstream events, fire
    /// due timers, collect new requests.
    fn service(&mut self) {
        while let Some((key, msg)) = self.to_edge.pop_front() {
            self.e.edge.handle_upstream(self.now, key, msg);
        }
        if let Some(t) = self.e.edge.poll_timeout() {
            if t <= self.now {
                self.e.edge.handle_timeout(self.now);
            }
        }
        while let Some(EdgeEvent { key, event }) = self.e.edge.poll_event() {
            match event {
                RequestEvent::Head { envelope, .. } => {
                    assert!(!envelope.path.is_empty(), "request without a path");
                    self.sides.push_back(Side { key, body_bytes: 0 });
                }
                RequestEvent::Body(ToUpstream::Data(b)) => {
                    if let Some(s) = self.sides.iter_mut().find(|s| s.key == key) {
                        s.body_bytes += b.len();
                    }
                }
                RequestEvent::Cancel => self.sides.retain(|s| s.key != key),
                RequestEvent::Body(_)
                | RequestEvent::ResponseCredit(_)
                | RequestEvent::ResponseGrant(_) => {}
            }
        }
        // Keep the client's HTTP/3 layer moving so its streams progress.
        if let Some(h3c) = self.client.h3.as_mut() {
            while let Ok((_, _)) = h3c.poll(&mut self.client.quic) {}
        }
        self.client_h3();
    }

    fn check(&mut self) {
        let m = &self.e.metrics;
        assert_eq!(
            m.conns_active.load(Ordering::Relaxed),
            self.e.edge.connections() as i64,
            "connections gauge disagrees with the table"
        );
        assert_eq!(
            m.requests_in_flight.load(Ordering::Relaxed),
            self.e.edge.requests_in_flight() as i64,
            "requests-in-flight gauge disagrees with the table"
        );
    }
}
