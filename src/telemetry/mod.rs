//! Logs and counters.
//!
//! Counters live per worker as relaxed atomics (no lock, no shared cache line
//! with other workers' hot counters) and are summed when scraped.

pub mod access;
pub mod backends;
pub mod exposition;
pub mod metrics;
pub mod probes;
pub mod signals;

use std::marker::PhantomData;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

pub use metrics::MetricsRegistry;

use crate::config::{LogFormat, Telemetry};

/// Installs the global `tracing` subscriber from `telemetry:`; `RUST_LOG`
/// overrides the level when set.
pub fn init_logging(t: &Telemetry) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&t.log))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let res = match t.log_format {
        LogFormat::Json => builder.json().with_current_span(false).try_init(),
        LogFormat::Text => builder.try_init(),
    };
    if let Err(e) = res {
        eprintln!("spooky: logging already initialised: {e}");
    }
}

/// Why a datagram was dropped without reaching a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// Not a parseable QUIC header (garbage, truncated), or from source port 0.
    Malformed,
    /// Short header or non-Initial long header for an unknown connection.
    UnknownConnection,
    /// An Initial too small to be legitimate (< 1200 bytes).
    ShortInitial,
    /// Retry token missing authenticity or expired.
    InvalidToken,
    /// `limits.max_connections` reached.
    OverCapacity,
    /// quiche rejected the packet for an existing connection.
    ConnectionError,
    /// `quic.new_connections_per_source` reached for the client's address.
    SourceRate,
    /// The client's address abandoned more streams than allowed in the
    /// current window (rapid reset, see `edge::abandon`): its new
    /// connections are refused until the window ends.
    AbandonedStreams,
}

impl DropReason {
    pub const ALL: [DropReason; 8] = [
        DropReason::Malformed,
        DropReason::UnknownConnection,
        DropReason::ShortInitial,
        DropReason::InvalidToken,
        DropReason::OverCapacity,
        DropReason::ConnectionError,
        DropReason::SourceRate,
        DropReason::AbandonedStreams,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::Malformed => "malformed",
            DropReason::UnknownConnection => "unknown_connection",
            DropReason::ShortInitial => "short_initial",
            DropReason::InvalidToken => "invalid_token",
            DropReason::OverCapacity => "over_capacity",
            DropReason::ConnectionError => "connection_error",
            DropReason::SourceRate => "source_rate",
            DropReason::AbandonedStreams => "abandoned_streams",
        }
    }
}

/// Per-worker counters. Written by one worker thread, read by the admin thread.
#[derive(Debug, Default)]
pub struct WorkerMetrics {
    pub conns_active: AtomicI64,
    pub conns_opened: AtomicU64,
    pub conns_closed: AtomicU64,
    pub handshakes: AtomicU64,
    pub handshake_failures: AtomicU64,
    pub retries_sent: AtomicU64,
    pub version_negotiations: AtomicU64,
    pub dropped: [AtomicU64; DropReason::ALL.len()],
    pub datagrams_in: AtomicU64,
    pub datagrams_out: AtomicU64,
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
    pub recv_syscalls: AtomicU64,
    pub send_syscalls: AtomicU64,
    pub gso_fallbacks: AtomicU64,
    pub send_errors: AtomicU64,
    /// io_uring: submissions, completions, receive-buffer exhaustion, truncation.
    pub ring_submits: AtomicU64,
    pub ring_completions: AtomicU64,
    pub recv_buffers_exhausted: AtomicU64,
    pub recv_truncated: AtomicU64,
    /// Requests by status class: 1xx..5xx, index 0 = reset/aborted.
    pub requests: [AtomicU64; 6],
    pub requests_in_flight: AtomicI64,
    /// Malformed requests by [`crate::router::MalformedReason`] index.
    pub malformed_requests: [AtomicU64; crate::router::MalformedReason::ALL.len()],
    pub client_cancels: AtomicU64,
    /// Connections closed with H3_EXCESSIVE_LOAD for abandoning too many
    /// streams (per connection or per source address).
    pub abandoned_stream_closes: AtomicU64,
    /// Requests whose client reset the stream before an upstream stream was
    /// opened: never sent to a backend.
    pub cancelled_before_dispatch: AtomicU64,
    pub upstream_connect_failures: AtomicU64,
    pub upstream_resets: AtomicU64,
    pub upstream_timeouts: AtomicU64,
    pub upstream_picks: AtomicU64,
    /// 1 when this worker's upstream TCP runs on its io_uring (`io.upstream_io`).
    pub upstream_ring_workers: AtomicI64,
    /// io_uring operations completed for upstream TCP streams.
    pub upstream_ring_ops: AtomicU64,
    /// Balancer and upstream health (issue 4).
    pub health_transitions: AtomicU64,
    pub ejections: AtomicU64,
    pub retries: AtomicU64,
    pub retry_budget_exhausted: AtomicU64,
    /// Requests answered 503 because every backend was at its in-flight cap
    /// or the upstream's pending queue was full.
    pub circuit_rejections: AtomicU64,
    pub no_healthy_backend: AtomicU64,
    pub pending: AtomicI64,
    /// Requests answered 503 because too many already waited for a pool
    /// stream (`circuit.max_pending`), or because none freed up before the
    /// request's deadline.
    pub pool_rejected_queue_full: AtomicU64,
    pub pool_rejected_deadline: AtomicU64,
    /// Datagrams handed to the worker that owns their connection.
    pub handoffs: AtomicU64,
    /// Packets held back by pacing until their send time.
    pub paced: AtomicU64,
    /// QUIC path events (client migration / NAT rebinding), by [`PathEvent`].
    pub path_events: [AtomicU64; 4],
    /// Admission (issue 10): connections whose handshake has not completed,
    /// Retry packets sent by [`RetryReason`], handshakes discarded by
    /// `quic.handshake_timeout_ms`.
    pub half_open: AtomicI64,
    pub retries_by_reason: [AtomicU64; RetryReason::ALL.len()],
    pub handshake_timeouts: AtomicU64,
    /// ICMP destination-unreachable reports that matched a connection's
    /// client (`edge::unreachable`), and connections discarded because the
    /// client stayed silent through the grace after one.
    pub icmp_unreachable_matched: AtomicU64,
    pub unreachable_closes: AtomicU64,
    /// Request duration, from the request head to the last byte (or reset).
    pub request_duration: AtomicHistogram<DurationBuckets>,
    /// Smoothed RTT of each connection, sampled when it closes.
    pub quic_rtt: AtomicHistogram<RttBuckets>,
    /// Datagrams (GRO segments) per receive syscall.
    pub recv_batch: AtomicHistogram<BatchBuckets>,
    /// Datagrams (GSO segments) per send syscall.
    pub send_batch: AtomicHistogram<BatchBuckets>,
    /// QUIC loss, congestion window, handshake time, closes by reason.
    pub obs: signals::ObsMetrics,
}

/// Why a new connection was answered with a stateless Retry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryReason {
    /// `quic.retry: true`: every new connection is validated.
    Always,
    /// `quic.retry: auto` and the worker's half-open connections reached
    /// `quic.retry_threshold`.
    HalfOpen,
}

impl RetryReason {
    pub const ALL: [RetryReason; 2] = [RetryReason::Always, RetryReason::HalfOpen];

    pub fn as_str(self) -> &'static str {
        match self {
            RetryReason::Always => "always",
            RetryReason::HalfOpen => "half_open",
        }
    }
}

/// What happened to a connection's network path; counted per event so an
/// operator can tell migrations that worked from ones that failed validation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathEvent {
    /// The peer moved to a new address (rebinding or active migration).
    PeerMigrated,
    /// A new path answered our PATH_CHALLENGE.
    Validated,
    /// A path never answered; its packets are no longer sent.
    FailedValidation,
    /// A path was closed (after failing, or replaced by another).
    Closed,
}

impl PathEvent {
    pub const ALL: [PathEvent; 4] = [
        PathEvent::PeerMigrated,
        PathEvent::Validated,
        PathEvent::FailedValidation,
        PathEvent::Closed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            PathEvent::PeerMigrated => "peer_migrated",
            PathEvent::Validated => "validated",
            PathEvent::FailedValidation => "failed_validation",
            PathEvent::Closed => "closed",
        }
    }
}

impl WorkerMetrics {
    /// Counts one Retry sent (also in the unlabelled total).
    pub fn retry_sent(&self, r: RetryReason) {
        Self::inc(&self.retries_sent);
        Self::inc(&self.retries_by_reason[r as usize]);
    }

    /// Counts one path event.
    pub fn path_event(&self, ev: PathEvent) {
        Self::inc(&self.path_events[ev as usize]);
    }

    #[inline]
    pub fn inc(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }

    #[inline]
    pub fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }

    pub fn dropped(&self, r: DropReason) {
        let i = DropReason::ALL.iter().position(|x| *x == r).unwrap_or(0);
        Self::inc(&self.dropped[i]);
    }

    /// Counts one malformed request under its reason.
    pub fn malformed(&self, r: crate::router::MalformedReason) {
        if let Some(c) = self.malformed_requests.get(r.index()) {
            Self::inc(c);
        }
    }

    pub fn dropped_count(&self, r: DropReason) -> u64 {
        let i = DropReason::ALL.iter().position(|x| *x == r).unwrap_or(0);
        self.dropped[i].load(Ordering::Relaxed)
    }

    /// Counts a finished request by status (0 = reset/aborted without status).
    pub fn request_done(&self, status: u16) {
        let idx = match status {
            100..=599 => (status / 100) as usize,
            _ => 0,
        };
        Self::inc(&self.requests[idx]);
    }

    /// Counts a finished request and records how long it took.
    pub fn request_finished(&self, status: u16, took: Option<Duration>) {
        self.request_done(status);
        if let Some(d) = took {
            self.request_duration.observe(d.as_secs_f64());
        }
    }
}

/// Most buckets (the `+Inf` one included) an [`AtomicHistogram`] can have.
pub const MAX_BUCKETS: usize = 20;

/// The bucket layout of one histogram family.
pub trait Buckets {
    /// Upper bounds, ascending; `+Inf` is implied after the last.
    const BOUNDS: &'static [f64];
    /// Sums are kept as integers of `1 / SUM_SCALE` units.
    const SUM_SCALE: f64;
}

/// Request duration in seconds: 0.5 ms .. 30 s.
#[derive(Debug)]
pub struct DurationBuckets;
impl Buckets for DurationBuckets {
    const BOUNDS: &'static [f64] = &[
        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    ];
    const SUM_SCALE: f64 = 1e6;
}

/// QUIC round-trip time in seconds: 50 µs (loopback) .. 1 s.
#[derive(Debug)]
pub struct RttBuckets;
impl Buckets for RttBuckets {
    const BOUNDS: &'static [f64] = &[
        0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
        1.0,
    ];
    const SUM_SCALE: f64 = 1e6;
}

/// Datagrams per syscall: 1 .. 64 (GSO/GRO trains), and larger batches.
#[derive(Debug)]
pub struct BatchBuckets;
impl Buckets for BatchBuckets {
    const BOUNDS: &'static [f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0];
    const SUM_SCALE: f64 = 1.0;
}

/// A fixed-bucket histogram of relaxed atomics: written by one worker, read
/// (summed with the other workers') on scrape. No lock per observation,
/// unlike `prometheus_client::metrics::histogram::Histogram`.
#[derive(Debug)]
pub struct AtomicHistogram<B> {
    /// Non-cumulative counts; index `B::BOUNDS.len()` is `+Inf`.
    buckets: [AtomicU64; MAX_BUCKETS],
    count: AtomicU64,
    /// Sum in `1 / B::SUM_SCALE` units.
    sum: AtomicU64,
    _layout: PhantomData<B>,
}

impl<B: Buckets> Default for AtomicHistogram<B> {
    fn default() -> Self {
        const { assert!(B::BOUNDS.len() < MAX_BUCKETS) };
        Self {
            buckets: Default::default(),
            count: AtomicU64::new(0),
            sum: AtomicU64::new(0),
            _layout: PhantomData,
        }
    }
}

impl<B: Buckets> AtomicHistogram<B> {
    pub fn observe(&self, v: f64) {
        let v = if v.is_finite() { v.max(0.0) } else { 0.0 };
        let idx = B::BOUNDS
            .iter()
            .position(|b| v <= *b)
            .unwrap_or(B::BOUNDS.len());
        if let Some(b) = self.buckets.get(idx) {
            b.fetch_add(1, Ordering::Relaxed);
        }
        // `as` saturates on overflow.
        self.sum
            .fetch_add((v * B::SUM_SCALE).round() as u64, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// Adds this histogram into `acc` = (sum, count, per-bucket counts).
    pub fn add_to(&self, acc: &mut HistogramSum) {
        if acc.buckets.len() != B::BOUNDS.len() + 1 {
            acc.buckets = B::BOUNDS
                .iter()
                .copied()
                .chain(std::iter::once(f64::MAX))
                .map(|b| (b, 0))
                .collect();
        }
        for (slot, b) in acc.buckets.iter_mut().zip(self.buckets.iter()) {
            slot.1 = slot.1.wrapping_add(b.load(Ordering::Relaxed));
        }
        acc.count = acc.count.wrapping_add(self.count.load(Ordering::Relaxed));
        acc.raw_sum = acc.raw_sum.wrapping_add(self.sum.load(Ordering::Relaxed));
        acc.scale = B::SUM_SCALE;
    }

    /// An empty sum with this layout (every bucket at zero).
    pub fn empty_sum() -> HistogramSum {
        HistogramSum {
            raw_sum: 0,
            scale: B::SUM_SCALE,
            count: 0,
            buckets: B::BOUNDS
                .iter()
                .copied()
                .chain(std::iter::once(f64::MAX))
                .map(|b| (b, 0))
                .collect(),
        }
    }
}

/// Histograms of several workers added up, in the shape
/// `prometheus_client`'s encoder takes (non-cumulative buckets, `f64::MAX`
/// standing for `+Inf`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HistogramSum {
    /// Sum in `1 / scale` units (added as integers, divided once).
    pub raw_sum: u64,
    pub scale: f64,
    pub count: u64,
    pub buckets: Vec<(f64, u64)>,
}

impl HistogramSum {
    pub fn sum(&self) -> f64 {
        self.raw_sum as f64 / self.scale
    }
}

/// Config reload counters and the generation in effect; written by the
/// control plane, read on scrape.
#[derive(Debug, Default)]
pub struct ReloadStats {
    pub ok: AtomicU64,
    pub error: AtomicU64,
    /// Generation of the config in effect (1 = the one loaded at start).
    pub generation: AtomicU64,
}
