//! Logs and counters.
//!
//! Counters live per worker as relaxed atomics (no lock, no shared cache line
//! with other workers' hot counters) and are summed when scraped.

pub mod backends;
pub mod metrics;

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

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
    /// Not a parseable QUIC header (garbage, truncated).
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
}

impl DropReason {
    pub const ALL: [DropReason; 6] = [
        DropReason::Malformed,
        DropReason::UnknownConnection,
        DropReason::ShortInitial,
        DropReason::InvalidToken,
        DropReason::OverCapacity,
        DropReason::ConnectionError,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::Malformed => "malformed",
            DropReason::UnknownConnection => "unknown_connection",
            DropReason::ShortInitial => "short_initial",
            DropReason::InvalidToken => "invalid_token",
            DropReason::OverCapacity => "over_capacity",
            DropReason::ConnectionError => "connection_error",
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
    pub dropped: [AtomicU64; 6],
    pub datagrams_in: AtomicU64,
    pub datagrams_out: AtomicU64,
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
    pub recv_syscalls: AtomicU64,
    pub send_syscalls: AtomicU64,
    pub gso_fallbacks: AtomicU64,
    pub send_errors: AtomicU64,
    /// Requests by status class: 1xx..5xx, index 0 = reset/aborted.
    pub requests: [AtomicU64; 6],
    pub requests_in_flight: AtomicI64,
    pub malformed_requests: AtomicU64,
    pub client_cancels: AtomicU64,
    pub upstream_connect_failures: AtomicU64,
    pub upstream_resets: AtomicU64,
    pub upstream_timeouts: AtomicU64,
    pub upstream_picks: AtomicU64,
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
}

impl WorkerMetrics {
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
}
