//! The QUIC + HTTP/3 edge, free of I/O.
//!
//! [`Edge`] owns one worker's QUIC connections (quiche) and their HTTP/3
//! state. It never touches a socket or a clock of its own: the driver feeds it
//! and drains it, in the style of `quinn-proto`:
//!
//! * inputs: [`Edge::handle_datagram`] for each received datagram,
//!   [`Edge::handle_upstream`] for each response event of the request path
//!   (`router::bridge::ToEdge`), [`Edge::handle_timeout`] when
//!   [`Edge::poll_timeout`]'s instant passed; each takes `now`;
//! * outputs: [`Edge::poll_event`] yields request events as plain values
//!   (`router::bridge::RequestEvent`: a request's `Envelope`, its body,
//!   response credit, cancellation), [`Edge::poll_transmit`] fills a buffer
//!   with a GSO train of packets for one peer, [`Edge::poll_timeout`] says
//!   when to call back.
//!
//! Wall-clock time and randomness come from the `source::Source` it was
//! built with. After any input, drain `poll_event` and `poll_transmit`
//! until empty.
// No clock or randomness outside tests: see clippy.toml.
#![cfg_attr(not(test), deny(clippy::disallowed_methods))]

mod abandon;
pub mod admission;
pub mod cid;
mod request;
pub mod unreachable;

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use quiche::h3;
use slab::Slab;

use crate::config::{Config, CongestionControl, RetryMode};
use crate::router::bridge::{RequestEvent, RequestKey, ToEdge};
use crate::source::Source;
use crate::telemetry::access::AccessSink;
use crate::telemetry::{DropReason, WorkerMetrics};
use admission::SourceRate;
use cid::{CidGenerator, RetryTokens, CID_LEN};
use request::Request;

/// HTTP/3 error codes (RFC 9114 §8.1) spooky sends.
pub mod h3_code {
    pub const NO_ERROR: u64 = 0x100;
    pub const INTERNAL_ERROR: u64 = 0x102;
    pub const REQUEST_REJECTED: u64 = 0x10b;
    pub const REQUEST_CANCELLED: u64 = 0x10c;
    pub const REQUEST_INCOMPLETE: u64 = 0x10d;
    pub const MESSAGE_ERROR: u64 = 0x10e;
    pub const EXCESSIVE_LOAD: u64 = 0x107;
}

/// Errors building the edge.
#[derive(Debug, thiserror::Error)]
pub enum EdgeError {
    #[error("QUIC configuration: {0}")]
    Quic(#[from] quiche::Error),
    #[error("HTTP/3 configuration: {0}")]
    H3(#[from] h3::Error),
    #[error("TLS {what} {path}: {err}")]
    Tls {
        what: &'static str,
        path: String,
        err: quiche::Error,
    },
}

/// Limits and switches the edge applies, from `config.yaml`.
#[derive(Debug, Clone)]
pub struct EdgeSettings {
    pub retry: RetryMode,
    /// `retry: auto`: half-open connections at which Retry starts.
    pub retry_threshold: usize,
    /// How long a connection may take to complete its handshake.
    pub handshake_timeout: std::time::Duration,
    /// This worker's share of `limits.max_connections` (a per-process limit).
    pub max_connections: usize,
    pub max_request_header_bytes: usize,
    pub max_body_buffer_bytes: usize,
    /// Per-stream starting grant and the budgets growth is charged to
    /// (see `router::bridge`).
    pub initial_body_buffer_bytes: usize,
    pub max_connection_buffer_bytes: usize,
    pub max_worker_buffer_bytes: usize,
    /// Rapid-reset guard (see `abandon`).
    pub max_abandoned_per_connection: u32,
    pub max_abandoned_per_source: u32,
    pub access_log: bool,
    /// Hold packets until quiche's `SendInfo.at` (see `quic.pacing`).
    pub pacing: bool,
}

impl EdgeSettings {
    /// The edge's view of `config.yaml`.
    pub fn from_config(cfg: &Config) -> Self {
        Self {
            retry: cfg.quic.retry,
            retry_threshold: cfg.quic.retry_threshold,
            handshake_timeout: std::time::Duration::from_millis(cfg.quic.handshake_timeout_ms),
            max_connections: admission::worker_share(cfg),
            max_request_header_bytes: cfg.limits.max_request_header_bytes,
            max_body_buffer_bytes: cfg.limits.max_body_buffer_bytes,
            // A stream never starts above its ceiling.
            initial_body_buffer_bytes: cfg
                .limits
                .initial_body_buffer_bytes
                .min(cfg.limits.max_body_buffer_bytes),
            max_connection_buffer_bytes: cfg.limits.max_connection_buffer_bytes,
            max_worker_buffer_bytes: cfg.limits.max_worker_buffer_bytes,
            max_abandoned_per_connection: cfg.limits.max_abandoned_streams_per_connection,
            max_abandoned_per_source: cfg.limits.max_abandoned_streams_per_source,
            access_log: cfg.telemetry.access_log,
            pacing: cfg.quic.pacing,
        }
    }
}

/// Smallest datagram that may carry a client's first Initial, and the
/// smallest one answered with Version Negotiation (RFC 9000 §14.1, §5.2.2):
/// anything shorter could turn spooky into an amplifier.
pub const MIN_INITIAL_DATAGRAM: usize = 1200;

/// The timer heap is rebuilt from live entries once it holds more than
/// this many entries and more than [`TIMER_STALE_RATIO`] per connection.
const TIMER_COMPACT_MIN: usize = 1024;

/// Heap entries per connection past which stale ones "clearly outnumber"
/// live ones (each connection has at most one live entry).
const TIMER_STALE_RATIO: usize = 4;

/// Packets due this soon are sent now: the driver's timers tick in
/// milliseconds, so finer pacing would only add wake-ups.
pub const PACING_HORIZON: std::time::Duration = std::time::Duration::from_millis(1);

/// How long the ACK of a packet that carried a new request may wait for
/// the response to ride with (quiche `hold_ack`, a vendored patch). A
/// backend that answers within it saves the client one datagram and
/// spooky one packet per request (a lone ACK); one that is slower gets the
/// ACK this much later, well inside the 25 ms `max_ack_delay` spooky
/// announces. Only the ACK of a single packet waits (RFC 9000 §13.2.2).
pub const ACK_HOLD: std::time::Duration = std::time::Duration::from_millis(5);

/// How long a connection must stay without requests before it gives
/// back the buffer capacity kept from its busiest moment (quiche
/// `shrink_buffers`, a vendored patch; [`Conn::shrink_buffers`]). Long
/// enough that a client between two requests does not pay the
/// reallocations, short enough that an idle connection costs only what
/// it still uses (issue 9: ~39 → ~30 KiB each).
pub const IDLE_SHRINK: std::time::Duration = std::time::Duration::from_secs(1);

/// A packet quiche built but pacing says to send later.
#[derive(Debug, Clone, Copy)]
struct Held {
    at: Instant,
    from: SocketAddr,
    to: SocketAddr,
    len: usize,
}

/// A request event for the request path, for the request `key`.
#[derive(Debug)]
pub struct EdgeEvent {
    pub key: RequestKey,
    pub event: RequestEvent,
}

/// One transmit produced by [`Edge::poll_transmit`]: `len` bytes at the start
/// of the caller's buffer, to be sent as a GSO train of `segment_size`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TransmitInfo {
    pub to: SocketAddr,
    pub from: SocketAddr,
    pub len: usize,
    pub segment_size: usize,
}

struct Conn {
    serial: u64,
    /// The first connection ID spooky issued for it (the access log's
    /// `conn_id`): kept apart from `cids`, which loses it once retired.
    scid: [u8; CID_LEN],
    quic: quiche::Connection,
    h3: Option<h3::Connection>,
    /// Request stream id → request slab slot.
    streams: HashMap<u64, usize>,
    cids: Vec<quiche::ConnectionId<'static>>,
    timer: Option<Instant>,
    dirty: bool,
    established: bool,
    /// Highest request stream id accepted (for GOAWAY).
    max_stream_id: Option<u64>,
    /// GOAWAY sent: no new requests; close once the last one finishes.
    closing: bool,
    /// When to send CONNECTION_CLOSE: a few PTOs after the last response
    /// was queued, so its bytes can still be retransmitted if lost.
    close_at: Option<Instant>,
    /// Streams whose whole response was handed to quiche but which quiche
    /// still holds, i.e. bytes not yet acknowledged (quiche collects a
    /// stream once its last byte is acked). A draining connection waits for
    /// them before CONNECTION_CLOSE, which would discard what is unsent.
    /// Pruned as it grows, so it stays short.
    unacked: Vec<u64>,
    /// Streams that ended by reset or early response. quiche's HTTP/3 layer
    /// keeps some state for such streams until the connection ends
    /// (cloudflare/quiche#2524), so a connection that abandons too many is
    /// closed with H3_EXCESSIVE_LOAD instead of growing without bound.
    abandoned: u32,
    /// Span of this connection (`conn` id and peer); entered while the
    /// edge works on it, parent of its requests' spans.
    span: tracing::Span,
    /// The one packet pacing holds back (bytes in `held_buf`); nothing
    /// else is built for this connection until it has gone out.
    held: Option<Held>,
    held_buf: Vec<u8>,
    /// Until when quiche holds an ACK-only packet ([`ACK_HOLD`]); the
    /// connection's timer sends it then.
    ack_hold: Option<Instant>,
    /// When the connection, without requests since its last one ended,
    /// gives back buffer capacity ([`IDLE_SHRINK`]).
    shrink_at: Option<Instant>,
    /// ICMP said the client's address cannot be reached: when the
    /// connection is discarded unless a packet from the client comes
    /// first ([`unreachable::UNREACHABLE_GRACE`]).
    unreachable_at: Option<Instant>,
    /// Until the handshake completes: when the connection is discarded
    /// unless it has (`quic.handshake_timeout_ms`).
    handshake_deadline: Option<Instant>,
    /// When the first Initial arrived; `handshake_done` reports from here.
    accepted_at: Instant,
    /// Body buffer growth granted to this connection's streams above their
    /// initial grants (`limits.max_connection_buffer_bytes`).
    buffer_grown: usize,
    /// STOP_SENDING frames from the client already looked at
    /// (`Edge::sweep_stopped`).
    stopped_seen: u64,
}

/// How often the worker calls [`Edge::sample_paths`].
pub const PATH_SAMPLE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// Connections one [`Edge::sample_paths`] call samples at most: bounds the
/// pass on a worker with very many connections (the next call goes on
/// where this one stopped).
pub const PATH_SAMPLES_PER_TICK: usize = 1000;

/// The per-worker QUIC/HTTP/3 state machine. See the module docs for the call protocol.
pub struct Edge {
    quic_config: quiche::Config,
    h3_config: h3::Config,
    settings: EdgeSettings,
    conns: Slab<Conn>,
    by_cid: HashMap<quiche::ConnectionId<'static>, usize>,
    next_conn_serial: u64,
    cid_gen: CidGenerator,
    /// This worker's id, carried in every CID it issues.
    worker: u8,
    /// Response writes into quiche so far (heads, body chunks, ends): lets
    /// `poll_transmit` tell whether a flush produced anything to send.
    body_writes: u64,
    tokens: RetryTokens,
    timers: BinaryHeap<Reverse<(Instant, usize, u64)>>,
    dirty: VecDeque<usize>,
    stateless: VecDeque<(Vec<u8>, SocketAddr, SocketAddr)>,
    requests: Slab<Request>,
    next_request_serial: u64,
    /// Request heads waiting for [`Edge::poll_event`] (see `new_request`).
    heads: VecDeque<request::PendingHead>,
    /// Request events for the request path, in order ([`Edge::poll_event`]).
    events: VecDeque<EdgeEvent>,
    metrics: Arc<WorkerMetrics>,
    draining: bool,
    scratch: Vec<u8>,
    /// The `now` of the input being handled (the edge never reads a clock).
    now: Instant,
    /// Wall-clock time (Retry token expiry) and randomness (CIDs, keys,
    /// trace ids).
    source: Box<dyn Source>,
    /// Abandoned streams per source IP (rapid reset across reconnects).
    abandoned_by_source: abandon::AbandonLedger,
    /// Connections whose handshake has not completed (`Conn::established`
    /// false): what `quic.retry: auto` compares with its threshold.
    half_open: usize,
    /// `quic.new_connections_per_source`.
    source_rate: SourceRate,
    /// Body buffer growth granted on this worker above the streams'
    /// initial grants (`limits.max_worker_buffer_bytes`).
    buffer_grown: usize,
    /// Where access-log lines go (`telemetry.access_log` says whether).
    access: Option<AccessSink>,
    /// Connection slot the next [`Edge::sample_paths`] starts at.
    sample_cursor: usize,
}

/// Builds the quiche transport config from `config.yaml`.
pub fn quic_config(cfg: &Config) -> Result<quiche::Config, EdgeError> {
    let mut q = quiche::Config::new(quiche::PROTOCOL_VERSION)?;
    let cert = cfg.listen.tls.cert.to_string_lossy().into_owned();
    let key = cfg.listen.tls.key.to_string_lossy().into_owned();
    q.load_cert_chain_from_pem_file(&cert)
        .map_err(|err| EdgeError::Tls {
            what: "certificate",
            path: cert.clone(),
            err,
        })?;
    q.load_priv_key_from_pem_file(&key)
        .map_err(|err| EdgeError::Tls {
            what: "private key",
            path: key.clone(),
            err,
        })?;
    let alpn: Vec<&[u8]> = cfg.listen.alpn.iter().map(|a| a.as_bytes()).collect();
    q.set_application_protos(&alpn)?;
    q.set_max_idle_timeout(cfg.quic.idle_timeout_ms);
    q.set_max_recv_udp_payload_size(spooky_uring::MAX_RECV_BUF);
    q.set_max_send_udp_payload_size(1350);
    q.set_initial_max_data(cfg.quic.initial_max_data);
    q.set_initial_max_stream_data_bidi_remote(cfg.quic.initial_max_stream_data);
    q.set_initial_max_stream_data_bidi_local(cfg.quic.initial_max_stream_data);
    q.set_initial_max_stream_data_uni(1024 * 1024);
    q.set_initial_max_streams_bidi(cfg.quic.max_streams_bidi);
    q.set_initial_max_streams_uni(16);
    q.set_max_stream_window(cfg.quic.initial_max_stream_data.max(16 * 1024 * 1024));
    q.set_max_connection_window(cfg.quic.initial_max_data.max(24 * 1024 * 1024));
    q.set_active_connection_id_limit(4);
    q.set_disable_active_migration(false);
    // No 0-RTT: early data can be replayed, and spooky forwards requests to
    // backends that cannot tell. (RFC 8470 `Early-Data` handling would be
    // needed first.)
    q.enable_pacing(cfg.quic.pacing);
    if cfg.quic.max_pacing_rate_mbps > 0 {
        // quiche 0.30 reads this in Mbit/s, in its BBR2 recovery only.
        q.set_max_pacing_rate(cfg.quic.max_pacing_rate_mbps);
    }
    q.set_cc_algorithm(match cfg.quic.cc {
        CongestionControl::Cubic => quiche::CongestionControlAlgorithm::CUBIC,
        CongestionControl::Reno => quiche::CongestionControlAlgorithm::Reno,
        CongestionControl::Bbr2 => quiche::CongestionControlAlgorithm::Bbr2Gcongestion,
    });
    Ok(q)
}

impl Edge {
    /// An edge for worker `worker` at time `now`, taking wall-clock time and
    /// randomness from `source` (the runtime's [`SystemSource`], or a fake).
    ///
    /// [`SystemSource`]: crate::source::SystemSource
    pub fn new(
        cfg: &Config,
        worker: u8,
        metrics: Arc<WorkerMetrics>,
        mut source: Box<dyn Source>,
        now: Instant,
    ) -> Result<Self, EdgeError> {
        let quic_config = quic_config(cfg)?;
        let mut h3_config = h3::Config::new()?;
        // Advertise a generous field-section limit so oversize requests reach
        // us and get a 431 instead of a connection error from quiche.
        h3_config.set_max_field_section_size(
            (cfg.limits.max_request_header_bytes as u64).saturating_mul(4),
        );
        Ok(Self {
            quic_config,
            h3_config,
            settings: EdgeSettings::from_config(cfg),
            conns: Slab::new(),
            by_cid: HashMap::new(),
            next_conn_serial: 1,
            cid_gen: CidGenerator::new(cfg.quic.server_id, worker),
            worker,
            body_writes: 0,
            tokens: RetryTokens::random(&mut *source),
            timers: BinaryHeap::new(),
            dirty: VecDeque::new(),
            stateless: VecDeque::new(),
            requests: Slab::new(),
            next_request_serial: 1,
            heads: VecDeque::new(),
            events: VecDeque::new(),
            metrics,
            draining: false,
            scratch: vec![0u8; 64 * 1024],
            now,
            source,
            abandoned_by_source: abandon::AbandonLedger::new(
                abandon::ABANDON_WINDOW,
                cfg.limits.max_abandoned_streams_per_source,
                abandon::ABANDON_TABLE_CAPACITY,
            ),
            half_open: 0,
            source_rate: SourceRate::new(cfg.quic.new_connections_per_source),
            buffer_grown: 0,
            access: None,
            sample_cursor: 0,
        })
    }

    /// Gives the edge its end of the access log; without one no lines are
    /// written, whatever `telemetry.access_log` says.
    pub fn set_access_log(&mut self, sink: AccessSink) {
        self.access = Some(sink);
    }

    /// Applies a reloaded config to what comes next: the TLS certificate and
    /// key and the transport parameters of new handshakes, and the limits
    /// and switches the edge reads per connection or request. Established
    /// connections keep the parameters they negotiated. On error (e.g. an
    /// unreadable key) nothing changes.
    pub fn reconfigure(&mut self, cfg: &Config) -> Result<(), EdgeError> {
        let quic_config = quic_config(cfg)?;
        let mut h3_config = h3::Config::new()?;
        h3_config.set_max_field_section_size(
            (cfg.limits.max_request_header_bytes as u64).saturating_mul(4),
        );
        self.quic_config = quic_config;
        self.h3_config = h3_config;
        self.settings = EdgeSettings::from_config(cfg);
        self.source_rate
            .set_limit(cfg.quic.new_connections_per_source);
        self.abandoned_by_source
            .set_limit(cfg.limits.max_abandoned_streams_per_source);
        Ok(())
    }

    /// Number of live connections.
    pub fn connections(&self) -> usize {
        self.conns.len()
    }

    /// Samples the congestion window and smoothed RTT of established
    /// connections' active paths into `spooky_quic_sampled_*`: at most
    /// [`PATH_SAMPLES_PER_TICK`], round-robin from where the last call
    /// stopped, so every connection is sampled in turn however many there
    /// are. The driver calls it every [`PATH_SAMPLE_INTERVAL`]. Returns how
    /// many were sampled.
    pub fn sample_paths(&mut self) -> usize {
        let conns = &self.conns;
        let obs = &self.metrics.obs;
        let mut sampled = 0;
        let visit = |k: usize| {
            let Some(c) = conns.get(k).filter(|c| c.established) else {
                return false;
            };
            let Some(p) = c.quic.path_stats().find(|p| p.active) else {
                return false;
            };
            obs.path_sampled(p.cwnd, p.bytes_in_flight, p.rtt);
            sampled += 1;
            true
        };
        self.sample_cursor = round_robin(
            conns.capacity(),
            self.sample_cursor,
            PATH_SAMPLES_PER_TICK,
            visit,
        );
        sampled
    }

    /// Number of connections whose handshake has not completed.
    pub fn half_open(&self) -> usize {
        self.half_open
    }

    /// Number of requests in flight.
    pub fn requests_in_flight(&self) -> usize {
        self.requests.len()
    }

    /// Feeds one received datagram (one GRO segment). Returns the worker to
    /// hand it to when it belongs to a connection another worker owns (the
    /// kernel hashed a migrated or rebound 4-tuple here).
    pub fn handle_datagram(
        &mut self,
        now: Instant,
        buf: &mut [u8],
        from: SocketAddr,
        to: SocketAddr,
    ) -> Option<u8> {
        self.now = now;
        WorkerMetrics::inc(&self.metrics.datagrams_in);
        WorkerMetrics::add(&self.metrics.bytes_in, buf.len() as u64);
        if from.port() == 0 {
            // No reply can reach source port 0, and the kernel refuses GSO
            // sends to it with EINVAL, which would read as "GSO unsupported"
            // and cost the whole worker its GSO: a spoofed packet must not.
            self.metrics.dropped(DropReason::Malformed);
            return None;
        }
        let (dcid, ty, version, scid, token) = match quiche::Header::from_slice(buf, CID_LEN) {
            Ok(h) => (
                h.dcid.into_owned(),
                h.ty,
                h.version,
                h.scid.into_owned(),
                h.token,
            ),
            Err(_) => {
                self.metrics.dropped(DropReason::Malformed);
                return None;
            }
        };
        let ci = match self.by_cid.get(&dcid) {
            Some(&ci) => ci,
            None => {
                if let Some(owner) = self.cid_gen.owner(&dcid) {
                    if owner != self.worker {
                        return Some(owner);
                    }
                }
                self.accept(buf.len(), &dcid, ty, version, &scid, token, from, to)?
            }
        };
        let conn = self.conns.get_mut(ci)?;
        match conn.quic.recv(buf, quiche::RecvInfo { from, to }) {
            Ok(_) => {
                // The client is there after all (ICMP can be stale, or
                // about a path it has left).
                conn.unreachable_at = None;
            }
            Err(quiche::Error::Done) => {}
            Err(e) => {
                tracing::debug!(conn = conn.quic.trace_id(), error = %e, "packet rejected");
                self.metrics.dropped(DropReason::ConnectionError);
            }
        }
        self.after_activity(ci, now);
        None
    }

    #[allow(clippy::too_many_arguments)]
    fn accept(
        &mut self,
        len: usize,
        dcid: &quiche::ConnectionId<'static>,
        ty: quiche::Type,
        version: u32,
        scid: &quiche::ConnectionId<'static>,
        token: Option<Vec<u8>>,
        from: SocketAddr,
        to: SocketAddr,
    ) -> Option<usize> {
        if ty != quiche::Type::Initial {
            self.metrics.dropped(DropReason::UnknownConnection);
            return None;
        }
        // Before anything is sent back: a reply to a shorter datagram would
        // amplify (RFC 9000 §5.2.2 for Version Negotiation, §14.1).
        if len < MIN_INITIAL_DATAGRAM {
            self.metrics.dropped(DropReason::ShortInitial);
            return None;
        }
        if !quiche::version_is_supported(version) {
            let mut out = vec![0u8; 1350];
            if let Ok(n) = quiche::negotiate_version(scid, dcid, &mut out) {
                out.truncate(n);
                self.stateless.push_back((out, from, to));
                WorkerMetrics::inc(&self.metrics.version_negotiations);
            }
            return None;
        }
        if self.draining || self.conns.len() >= self.settings.max_connections {
            self.metrics.dropped(DropReason::OverCapacity);
            return None;
        }
        // Only addresses that completed handshakes and then abandoned streams
        // are in the ledger, so a spoofed Initial can only hurt the address
        // it claims, which is being refused anyway.
        if self.abandoned_by_source.is_over(from.ip(), self.now) {
            self.metrics.dropped(DropReason::AbandonedStreams);
            return None;
        }
        let (new_scid, odcid) = self.validate_address(dcid, version, scid, token, from, to)?;
        if !self.source_rate.admit(from.ip(), self.now) {
            self.metrics.dropped(DropReason::SourceRate);
            return None;
        }
        let quic = match quiche::accept(&new_scid, odcid.as_ref(), to, from, &mut self.quic_config)
        {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!(error = %e, %from, "accept failed");
                self.metrics.dropped(DropReason::ConnectionError);
                return None;
            }
        };
        let serial = self.next_conn_serial;
        self.next_conn_serial += 1;
        let mut scid = [0u8; CID_LEN];
        let n = new_scid.len().min(CID_LEN);
        scid[..n].copy_from_slice(&new_scid[..n]);
        let ci = self.conns.insert(Conn {
            serial,
            scid,
            quic,
            h3: None,
            streams: HashMap::new(),
            // The client's chosen DCID also maps here until it switches to
            // ours, so retransmitted Initials find this connection.
            cids: vec![new_scid.clone(), dcid.clone()],
            timer: None,
            dirty: false,
            established: false,
            max_stream_id: None,
            closing: false,
            close_at: None,
            unacked: Vec::new(),
            abandoned: 0,
            span: tracing::info_span!("conn", conn = serial, peer = %from),
            held: None,
            ack_hold: None,
            shrink_at: None,
            unreachable_at: None,
            held_buf: Vec::new(),
            handshake_deadline: Some(self.now + self.settings.handshake_timeout),
            accepted_at: self.now,
            buffer_grown: 0,
            stopped_seen: 0,
        });
        self.set_half_open(self.half_open + 1);
        self.by_cid.insert(new_scid, ci);
        self.by_cid.insert(dcid.clone(), ci);
        WorkerMetrics::inc(&self.metrics.conns_opened);
        crate::telemetry::probes::conn_accept(serial, &from);
        self.metrics.conns_active.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(%from, conn = ci, "connection accepted");
        Some(ci)
    }

    /// Address validation of a new connection: with a valid Retry token its
    /// (our CID, original DCID); with none, and Retry required now, a Retry
    /// is queued and `None` returned; with none and no Retry required, a
    /// fresh CID. An invalid token is dropped (RFC 9000 §8.1.3 allows it).
    fn validate_address(
        &mut self,
        dcid: &quiche::ConnectionId<'static>,
        version: u32,
        scid: &quiche::ConnectionId<'static>,
        token: Option<Vec<u8>>,
        from: SocketAddr,
        to: SocketAddr,
    ) -> Option<(
        quiche::ConnectionId<'static>,
        Option<quiche::ConnectionId<'static>>,
    )> {
        let token = token.unwrap_or_default();
        if !token.is_empty() {
            return match self
                .tokens
                .validate(&token, &from, self.source.wall_clock())
            {
                Some(o) if dcid.len() == CID_LEN => Some((dcid.clone(), Some(o))),
                _ => {
                    self.metrics.dropped(DropReason::InvalidToken);
                    None
                }
            };
        }
        let s = &self.settings;
        let Some(reason) = admission::retry_reason(s.retry, self.half_open, s.retry_threshold)
        else {
            return Some((self.cid_gen.generate(&mut *self.source), None));
        };
        let new_scid = self.cid_gen.generate(&mut *self.source);
        let token = self.tokens.mint(&from, dcid, self.source.wall_clock());
        let mut out = vec![0u8; 1350];
        if let Ok(n) = quiche::retry(scid, dcid, &new_scid, &token, version, &mut out) {
            out.truncate(n);
            self.stateless.push_back((out, from, to));
            self.metrics.retry_sent(reason);
        }
        None
    }

    /// Sets the half-open count and its gauge.
    fn set_half_open(&mut self, n: usize) {
        let delta = n as i64 - self.half_open as i64;
        self.half_open = n;
        self.metrics.half_open.fetch_add(delta, Ordering::Relaxed);
    }

    /// Runs everything that may follow new input on a connection.
    fn after_activity(&mut self, ci: usize, now: Instant) {
        let Some(conn) = self.conns.get_mut(ci) else {
            return;
        };
        let span = conn.span.clone();
        let _entered = span.enter();
        if conn.h3.is_none() && conn.quic.is_established() {
            match h3::Connection::with_transport(&mut conn.quic, &self.h3_config) {
                Ok(h) => conn.h3 = Some(h),
                Err(e) => {
                    tracing::debug!(error = %e, "HTTP/3 setup failed");
                    let _ = conn.quic.close(true, h3_code::INTERNAL_ERROR, b"h3 setup");
                }
            }
        }
        if !conn.established && conn.quic.is_established() {
            conn.established = true;
            conn.handshake_deadline = None;
            self.half_open = self.half_open.saturating_sub(1);
            self.metrics.half_open.fetch_sub(1, Ordering::Relaxed);
            WorkerMetrics::inc(&self.metrics.handshakes);
            self.metrics.obs.handshake_done(
                conn.serial,
                self.now.saturating_duration_since(conn.accepted_at),
            );
            // Give the peer spare connection IDs so it can migrate.
            while conn.quic.scids_left() > 0 {
                let cid = self.cid_gen.generate(&mut *self.source);
                let token = self.cid_gen.reset_token(self.tokens.key(), &cid);
                if conn.quic.new_scid(&cid, token, false).is_err() {
                    break;
                }
                conn.cids.push(cid.clone());
                self.by_cid.insert(cid, ci);
            }
        }
        while let Some(retired) = conn.quic.retired_scid_next() {
            self.by_cid.remove(&retired);
            conn.cids.retain(|c| *c != retired);
        }
        while let Some(ev) = conn.quic.path_event_next() {
            on_path_event(&self.metrics, ev);
        }
        self.poll_h3(ci, now);
        self.cancel_if_draining(ci);
        self.sweep_stopped(ci);
        self.flush_writable(ci);
        self.mark_dirty(ci);
        self.update_timer(ci);
    }

    pub(super) fn mark_dirty(&mut self, ci: usize) {
        if let Some(conn) = self.conns.get_mut(ci) {
            if !conn.dirty {
                conn.dirty = true;
                self.dirty.push_back(ci);
            }
        }
    }

    fn update_timer(&mut self, ci: usize) {
        let now = self.now;
        if let Some(conn) = self.conns.get_mut(ci) {
            // A held packet already due needs no timer: whoever made it due
            // (a timer, new input) also marked the connection dirty.
            let t = [
                conn.quic.timeout_instant(),
                conn.close_at,
                conn.held.map(|h| h.at).filter(|&at| at > now),
                conn.ack_hold.filter(|&at| at > now),
                conn.shrink_at,
                conn.unreachable_at,
                conn.handshake_deadline,
            ]
            .into_iter()
            .flatten()
            .min();
            if t != conn.timer {
                conn.timer = t;
                if let Some(t) = t {
                    self.timers.push(Reverse((t, ci, conn.serial)));
                    self.compact_timers();
                }
            }
        }
    }

    /// Drops stale timer entries once they clearly outnumber live ones.
    ///
    /// Entries are deleted lazily (a changed deadline pushes a new entry;
    /// the old one is skipped when it surfaces), so a peer whose packets
    /// keep moving its deadline later would otherwise grow the heap by one
    /// entry per packet until the old deadlines pass. Rebuilding costs
    /// O(heap) once the heap has doubled past the bound: O(1) amortised.
    fn compact_timers(&mut self) {
        let bound = TIMER_COMPACT_MIN.max(self.conns.len().saturating_mul(TIMER_STALE_RATIO));
        if self.timers.len() <= bound {
            return;
        }
        let conns = &self.conns;
        self.timers.retain(|Reverse((t, ci, serial))| {
            conns
                .get(*ci)
                .is_some_and(|c| c.serial == *serial && c.timer == Some(*t))
        });
    }

    /// Timer heap entries (live and stale), for tests.
    #[cfg(test)]
    fn timer_entries(&self) -> usize {
        self.timers.len()
    }

    /// Gives the streams that became writable since the last call a chance
    /// to write their pending response bytes.
    ///
    /// `stream_writable_next` hands out each stream once per time it turns
    /// writable (quiche re-arms it on MAX_STREAM_DATA, STOP_SENDING, or when
    /// a partial write left it waiting for capacity), so the work here is
    /// proportional to what changed, not to the streams open (the full
    /// `writable()` set was collected into a new `Vec` on every packet).
    fn flush_writable(&mut self, ci: usize) {
        loop {
            let Some(conn) = self.conns.get_mut(ci) else {
                return;
            };
            if conn.h3.is_none() {
                return;
            }
            let Some(sid) = conn.quic.stream_writable_next() else {
                return;
            };
            let Some(&slot) = conn.streams.get(&sid) else {
                continue;
            };
            // A client that sent STOP_SENDING shows up here as writable with
            // an error; notice it even when there is nothing to write yet, so
            // the upstream stream is reset at once.
            if let Err(quiche::Error::StreamStopped(code)) = conn.quic.stream_capacity(sid) {
                self.client_cancelled(slot, code);
                continue;
            }
            self.flush_response(slot);
        }
    }

    /// Cancels the requests whose streams the client stopped (STOP_SENDING).
    ///
    /// `flush_writable` sees a stopped stream only if quiche re-marks it
    /// writable, and quiche does that only for a stream that was not writable
    /// already: a stream handed out by `stream_writable_next` earlier with
    /// nothing to write (a request still waiting for its backend) would keep
    /// its upstream request running. quiche counts the STOP_SENDING frames it
    /// received, so the streams are looked at only when that count moved:
    /// no work on the usual event, one pass over this connection's requests
    /// when its client stopped some.
    fn sweep_stopped(&mut self, ci: usize) {
        let Some(conn) = self.conns.get_mut(ci) else {
            return;
        };
        let stopped = conn.quic.stats().stopped_stream_count_remote;
        if stopped == conn.stopped_seen {
            return;
        }
        conn.stopped_seen = stopped;
        let gone: Vec<(usize, u64)> = conn
            .streams
            .iter()
            .filter_map(|(&sid, &slot)| match conn.quic.stream_capacity(sid) {
                Err(quiche::Error::StreamStopped(code)) => Some((slot, code)),
                _ => None,
            })
            .collect();
        for (slot, code) in gone {
            self.client_cancelled(slot, code);
        }
    }

    /// Feeds an event from an upstream task.
    pub fn handle_upstream(&mut self, now: Instant, key: RequestKey, msg: ToEdge) {
        self.now = now;
        let Some(req) = self
            .requests
            .get_mut(key.slot)
            .filter(|r| r.serial == key.serial)
        else {
            return; // the stream is gone; its upstream task was cancelled
        };
        let ci = req.conn;
        match msg {
            ToEdge::Headers { head, head_after } => {
                req.log.upstream_time = Some(head_after);
                req.set_head(head);
            }
            ToEdge::Data(b) => req.resp.push_chunk(b, true),
            ToEdge::Starved => req.resp.starved = true,
            ToEdge::Trailers(t) => req.resp.trailers = Some(t),
            ToEdge::End => req.resp.end = true,
            ToEdge::Fail {
                status,
                reason,
                retry_after,
            } => {
                tracing::debug!(request_id = req.log.request_id, status, %reason, "request failed before response");
                req.log.error = Some(reason);
                if !req.resp.head_started() {
                    req.synthesize(status, retry_after);
                } else {
                    self.reset_stream(key.slot, h3_code::INTERNAL_ERROR);
                    self.mark_dirty(ci);
                    self.update_timer(ci);
                    return;
                }
            }
            ToEdge::Reset { code } => {
                // H3_MESSAGE_ERROR from upstream = a request the h2 library
                // refused as malformed, counted there; not a backend reset.
                if code != h3_code::MESSAGE_ERROR {
                    WorkerMetrics::inc(&self.metrics.upstream_resets);
                }
                self.reset_stream(key.slot, code);
                self.mark_dirty(ci);
                self.update_timer(ci);
                return;
            }
            ToEdge::RequestCredit(n) => {
                req.req_credit = req.req_credit.saturating_add(n).min(req.req_grant);
                if req.req_data_pending {
                    self.grow_request_buffer(key.slot);
                    self.read_request_body(key.slot);
                    // Draining the last bytes queues quiche's Finished event
                    // (and maybe others): deliver them now, not at the next
                    // packet, which may never come while the client waits.
                    self.poll_h3(ci, now);
                }
                self.mark_dirty(ci);
                self.update_timer(ci);
                return;
            }
            ToEdge::Backend { upstream, backend } => {
                req.log.upstream = Some(upstream);
                req.log.backend = Some(backend);
                return;
            }
        }
        self.flush_response(key.slot);
        self.mark_dirty(ci);
        self.update_timer(ci);
    }

    /// Handles expired connection timers.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.now = now;
        while let Some(Reverse((t, ci, serial))) = self.timers.peek().copied() {
            if t > now {
                break;
            }
            self.timers.pop();
            let Some(conn) = self.conns.get_mut(ci) else {
                continue;
            };
            if conn.serial != serial || conn.timer != Some(t) {
                continue; // stale entry
            }
            conn.timer = None;
            if conn.handshake_deadline.is_some_and(|d| d <= now) {
                self.handshake_timed_out(ci);
                continue;
            }
            if conn.unreachable_at.is_some_and(|d| d <= now) {
                self.peer_unreachable(ci);
                continue;
            }
            if conn.close_at.is_some_and(|c| c <= now) {
                if responses_unacked(conn) {
                    // Still delivering: look again a few PTOs later. The
                    // drain deadline's force_close_all bounds the wait.
                    conn.close_at = Some(now + close_delay(&conn.quic));
                } else {
                    conn.close_at = None;
                    let _ = conn
                        .quic
                        .close(true, h3_code::NO_ERROR, b"server shutting down");
                }
            }
            if conn.ack_hold.is_some_and(|t| t <= now) {
                conn.release_ack();
            }
            if conn.shrink_at.is_some_and(|t| t <= now) {
                conn.shrink_buffers();
            }
            conn.quic.on_timeout();
            self.after_activity(ci, now);
            self.reap_if_closed(ci);
        }
    }

    /// When the driver should call [`Edge::handle_timeout`] next.
    pub fn poll_timeout(&mut self) -> Option<Instant> {
        while let Some(Reverse((t, ci, serial))) = self.timers.peek().copied() {
            match self.conns.get(ci) {
                Some(c) if c.serial == serial && c.timer == Some(t) => return Some(t),
                _ => {
                    self.timers.pop();
                }
            }
        }
        None
    }

    /// Next new request for the driver.
    ///
    /// Heads are mapped to envelopes here, after the receive batch, so a
    /// request whose client already reset the stream (rapid reset: HEADERS
    /// and RESET_STREAM in one batch) is dropped without any header work,
    /// no upstream task is spawned and no backend sees it.
    pub fn poll_event(&mut self) -> Option<EdgeEvent> {
        loop {
            if let Some(ev) = self.events.pop_front() {
                return Some(ev);
            }
            let head = self.heads.pop_front()?;
            let live = self
                .requests
                .get(head.key.slot)
                .is_some_and(|r| r.serial == head.key.serial);
            if !live {
                // Reset in the batch that brought it (rapid reset): no
                // header work, nothing upstream.
                WorkerMetrics::inc(&self.metrics.cancelled_before_dispatch);
                continue;
            }
            self.dispatch(head);
        }
    }

    /// Queues a request event for [`Edge::poll_event`].
    fn emit(&mut self, key: RequestKey, event: RequestEvent) {
        self.events.push_back(EdgeEvent { key, event });
    }

    /// Fills `out` with the next train of packets (one peer, one segment size).
    ///
    /// `max_segments` is the most datagrams one send may carry (1 = no GSO).
    /// Connections take turns: each yields at most one train per call.
    pub fn poll_transmit(
        &mut self,
        now: Instant,
        out: &mut [u8],
        max_segments: usize,
    ) -> Option<TransmitInfo> {
        if let Some((pkt, to, from)) = self.stateless.pop_front() {
            let n = pkt.len().min(out.len());
            out[..n].copy_from_slice(&pkt[..n]);
            return Some(TransmitInfo {
                to,
                from,
                len: n,
                segment_size: n,
            });
        }
        while let Some(ci) = self.dirty.pop_front() {
            let Some(conn) = self.conns.get_mut(ci) else {
                continue;
            };
            conn.dirty = false;
            let mss = conn.quic.max_send_udp_payload_size().min(out.len());
            let limit = (mss * max_segments.max(1)).min(out.len());
            let Train {
                total,
                path,
                more,
                drained,
                paced,
                held,
            } = fill_train(conn, now, out, mss, limit, self.settings.pacing);
            if held {
                WorkerMetrics::inc(&self.metrics.paced);
            }
            if more {
                conn.dirty = true;
                self.dirty.push_back(ci);
            } else if paced && drained && !conn.streams.is_empty() {
                // `send()` may have opened the congestion window (quiche
                // recomputes it there), and on a paced connection no input
                // may follow to notice: its last packet can be an ACK-only
                // one released by a timer. Give waiting response bytes their
                // chance now (only here: unpaced sends follow input anyway).
                let before = self.body_writes;
                self.flush_writable(ci);
                if self.body_writes != before {
                    self.mark_dirty(ci);
                }
            }
            self.update_timer(ci);
            if total == 0 {
                self.reap_if_closed(ci);
                continue;
            }
            let (from, to) = path.unwrap_or_else(|| unreachable!("total > 0 implies a path"));
            WorkerMetrics::add(&self.metrics.bytes_out, total as u64);
            WorkerMetrics::add(&self.metrics.datagrams_out, total.div_ceil(mss) as u64);
            return Some(TransmitInfo {
                to,
                from,
                len: total,
                segment_size: mss,
            });
        }
        None
    }

    /// Starts a graceful close of every connection: new connections are
    /// refused; each connection gets a GOAWAY naming the first request it
    /// did not accept (so clients know exactly what is safe to retry), and
    /// closes with H3_NO_ERROR once its in-flight requests finish. Call
    /// [`Edge::force_close_all`] when the drain deadline passes.
    pub fn close_all(&mut self, now: Instant) {
        self.now = now;
        self.draining = true;
        let keys: Vec<usize> = self.conns.iter().map(|(k, _)| k).collect();
        for ci in keys {
            if let Some(conn) = self.conns.get_mut(ci) {
                conn.closing = true;
                if let Some(h3) = conn.h3.as_mut() {
                    let next = conn.max_stream_id.map_or(0, |m| m + 4);
                    let _ = h3.send_goaway(&mut conn.quic, next);
                }
                if conn.streams.is_empty() {
                    conn.close_at = Some(now + close_delay(&conn.quic));
                }
            }
            self.mark_dirty(ci);
            self.update_timer(ci);
        }
    }

    /// Closes every connection now, in-flight requests or not.
    pub fn force_close_all(&mut self) {
        self.draining = true;
        let keys: Vec<usize> = self.conns.iter().map(|(k, _)| k).collect();
        for ci in keys {
            if let Some(conn) = self.conns.get_mut(ci) {
                let _ = conn
                    .quic
                    .close(true, h3_code::NO_ERROR, b"server shutting down");
            }
            self.mark_dirty(ci);
            self.update_timer(ci);
        }
    }

    /// Whether GOAWAY was sent to every connection.
    pub fn is_draining(&self) -> bool {
        self.draining
    }

    /// Discards a connection whose handshake did not complete in time,
    /// silently, as an idle timeout would (RFC 9000 §10.1): no more bytes
    /// go to an address that never proved it can receive them.
    fn handshake_timed_out(&mut self, ci: usize) {
        WorkerMetrics::inc(&self.metrics.handshake_timeouts);
        tracing::debug!(conn = ci, "handshake timed out; connection discarded");
        self.remove_conn(ci);
    }

    fn reap_if_closed(&mut self, ci: usize) {
        let closed = self.conns.get(ci).is_some_and(|c| c.quic.is_closed());
        if closed {
            self.remove_conn(ci);
        }
    }

    /// Removes a connection and everything that refers to it.
    fn remove_conn(&mut self, ci: usize) {
        let Some(conn) = self.conns.try_remove(ci) else {
            return;
        };
        for cid in &conn.cids {
            if self.by_cid.get(cid) == Some(&ci) {
                self.by_cid.remove(cid);
            }
        }
        // Cancel every request still open on this connection.
        for (_, slot) in conn.streams.iter() {
            if let Some(req) = self.requests.try_remove(*slot) {
                self.buffer_grown = self.buffer_grown.saturating_sub(req.buffer_grown);
                if req.upstream_open {
                    self.events.push_back(EdgeEvent {
                        key: req.key(*slot),
                        event: RequestEvent::Cancel,
                    });
                }
                self.metrics
                    .requests_in_flight
                    .fetch_sub(1, Ordering::Relaxed);
                WorkerMetrics::inc(&self.metrics.client_cancels);
                let took = req
                    .log
                    .started
                    .map(|t| self.now.saturating_duration_since(t));
                self.metrics.request_finished(0, took);
                req.probe_done(0, took);
                if self.settings.access_log {
                    let tag = request::ConnTag {
                        serial: conn.serial,
                        scid: &conn.scid,
                    };
                    req.log_access(self.access.as_mut(), Some(tag), "connection_closed", took);
                }
            }
        }
        if !conn.established {
            WorkerMetrics::inc(&self.metrics.handshake_failures);
            self.set_half_open(self.half_open.saturating_sub(1));
        }
        WorkerMetrics::inc(&self.metrics.conns_closed);
        self.metrics.conns_active.fetch_sub(1, Ordering::Relaxed);
        self.metrics
            .obs
            .conn_closed(conn.serial, &conn.quic, conn.established);
        if let Some(p) = conn.quic.path_stats().next() {
            self.metrics.quic_rtt.observe(p.rtt.as_secs_f64());
        }
        let stats = conn.quic.stats();
        tracing::debug!(
            conn = ci,
            peer_error = ?conn.quic.peer_error(),
            local_error = ?conn.quic.local_error(),
            timed_out = conn.quic.is_timed_out(),
            sent = stats.sent,
            recv = stats.recv,
            lost = stats.lost,
            "connection closed"
        );
    }
}

/// Visits slots `start, start + 1, …` of a table of `capacity` slots,
/// wrapping around, until `limit` visits returned true or every slot was
/// visited once; returns the slot the next pass starts at.
fn round_robin(
    capacity: usize,
    start: usize,
    limit: usize,
    mut visit: impl FnMut(usize) -> bool,
) -> usize {
    if capacity == 0 {
        return 0;
    }
    let mut k = start % capacity;
    let mut taken = 0;
    for _ in 0..capacity {
        if taken >= limit {
            break;
        }
        if visit(k) {
            taken += 1;
        }
        k = (k + 1) % capacity;
    }
    k
}

impl Conn {
    /// Lets the ACK of the packet just received wait for the response of
    /// the request it carried ([`ACK_HOLD`]).
    fn hold_ack(&mut self, now: Instant) {
        let until = now + ACK_HOLD;
        self.ack_hold = Some(until);
        self.quic.hold_ack(Some(until));
    }

    /// Ends the hold: an ACK quiche still owes goes out with the next send.
    fn release_ack(&mut self) {
        if self.ack_hold.take().is_some() {
            self.quic.hold_ack(None);
        }
    }

    /// Gives back the capacity the connection's tables and buffers kept
    /// from its busiest moment, in quiche (stream maps, sent-packet
    /// queues, loss-detection scratch), its HTTP/3 layer and here: an
    /// idle connection then holds only what it still uses.
    fn shrink_buffers(&mut self) {
        self.shrink_at = None;
        self.quic.shrink_buffers();
        if let Some(h3) = self.h3.as_mut() {
            h3.shrink_buffers();
        }
        self.streams.shrink_to_fit();
        responses_unacked(self);
        self.unacked.shrink_to_fit();
        if self.held.is_none() {
            self.held_buf = Vec::new();
        }
    }
}

/// Whether quiche still holds a stream whose response spooky finished
/// (see `Conn::unacked`); forgets the streams it has collected.
fn responses_unacked(conn: &mut Conn) -> bool {
    let quic = &mut conn.quic;
    // InvalidStreamState: collected, every byte acked. StreamStopped: the
    // client wants no more of it. Either way, nothing left to wait for.
    conn.unacked.retain(|&id| quic.stream_capacity(id).is_ok());
    !conn.unacked.is_empty()
}

/// How long after its last response a draining connection waits before
/// CONNECTION_CLOSE: about three PTOs, so lost response bytes can still be
/// retransmitted.
fn close_delay(quic: &quiche::Connection) -> std::time::Duration {
    let (rtt, var) = quic
        .path_stats()
        .next()
        .map(|p| (p.rtt, p.rttvar))
        .unwrap_or((
            std::time::Duration::from_millis(100),
            std::time::Duration::from_millis(50),
        ));
    (rtt + var * 4 + std::time::Duration::from_millis(25)) * 3
}

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_admission;

/// Logs and counts one quiche path event (client address changes).
fn on_path_event(metrics: &WorkerMetrics, ev: quiche::PathEvent) {
    use crate::telemetry::PathEvent as P;
    match ev {
        quiche::PathEvent::PeerMigrated(local, peer) => {
            metrics.path_event(P::PeerMigrated);
            tracing::info!(%local, %peer, "client moved to a new address");
        }
        quiche::PathEvent::Validated(local, peer) => {
            metrics.path_event(P::Validated);
            tracing::info!(%local, %peer, "path validated");
        }
        quiche::PathEvent::FailedValidation(local, peer) => {
            metrics.path_event(P::FailedValidation);
            tracing::info!(%local, %peer, "path failed validation");
        }
        quiche::PathEvent::Closed(local, peer) => {
            metrics.path_event(P::Closed);
            tracing::info!(%local, %peer, "path closed");
        }
        // New paths and CID reuse are part of the above; nothing to do.
        _ => {}
    }
}

/// One GSO train of one connection, as [`fill_train`] built it.
struct Train {
    /// Bytes written to the start of `out`.
    total: usize,
    /// The (from, to) of every packet in it.
    path: Option<(SocketAddr, SocketAddr)>,
    /// The connection may have more to send (another train).
    more: bool,
    /// quiche said `Done` on an unpinned send: nothing more for now.
    drained: bool,
    /// A paced packet was held back or released.
    paced: bool,
    /// A packet built now was held back for its time.
    held: bool,
}

/// Fills `out` with MSS-sized packets of `conn` on one path, up to `limit`
/// bytes: a short packet ends the train; a packet pacing holds back (built
/// but not due) is kept in the connection and goes first next time.
fn fill_train(
    conn: &mut Conn,
    now: Instant,
    out: &mut [u8],
    mss: usize,
    limit: usize,
    pacing: bool,
) -> Train {
    let mut total = 0;
    let mut path: Option<(SocketAddr, SocketAddr)> = None;
    let mut more = false;
    // quiche stamps `at` from its own clock: compare with the caller's
    // `now`, not with the last input's (this call may come much later).
    let horizon = now + PACING_HORIZON;
    let mut drained = false;
    let mut paced = false;
    let mut held = false;
    loop {
        if total + mss > limit {
            more = true;
            break;
        }
        if let Some(h) = conn.held {
            // The paced packet goes first, once due; until then the
            // connection's timer (set to `h.at`) brings us back.
            if h.at > horizon {
                break;
            }
            if path.is_some_and(|p| p != (h.from, h.to)) || h.len > mss {
                more = true;
                break;
            }
            out[total..total + h.len].copy_from_slice(&conn.held_buf[..h.len]);
            conn.held = None;
            paced = true;
            path = Some((h.from, h.to));
            total += h.len;
            if h.len < mss {
                more = true;
                break;
            }
            continue;
        }
        let buf = &mut out[total..total + mss];
        let res = match path {
            None => conn.quic.send(buf),
            Some((from, to)) => conn.quic.send_on_path(buf, Some(from), Some(to)),
        };
        match res {
            Ok((n, info)) if pacing && info.at > horizon => {
                // Built but not due: keep it for its time.
                conn.held_buf.clear();
                conn.held_buf.extend_from_slice(&buf[..n]);
                conn.held = Some(Held {
                    at: info.at,
                    from: info.from,
                    to: info.to,
                    len: n,
                });
                paced = true;
                held = true;
                break;
            }
            Ok((n, info)) => {
                if path.is_none() {
                    path = Some((info.from, info.to));
                }
                total += n;
                if n < mss {
                    // A short packet ends a GSO train; the connection
                    // may still have more for another train.
                    more = true;
                    break;
                }
            }
            Err(quiche::Error::Done) => {
                // Done on the pinned path says nothing about other
                // paths (a migration's new path, PATH_CHALLENGEs):
                // come back with an unpinned `send()`.
                more = path.is_some();
                drained = !more;
                break;
            }
            Err(e) => {
                tracing::debug!(error = %e, "send failed; closing connection");
                let _ = conn.quic.close(false, 0x1, b"send failed");
                break;
            }
        }
    }
    Train {
        total,
        path,
        more,
        drained,
        paced,
        held,
    }
}
