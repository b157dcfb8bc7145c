//! The channel pair between a request stream on the edge and the upstream
//! task that serves it, with byte budgets that carry backpressure both ways.
//!
//! Request direction: the edge reads body bytes from quiche only while
//! `req_budget` has permits, so the client's QUIC stream window opens only as
//! fast as the upstream task hands bytes to h2 (which returns the permits once
//! h2 granted send capacity). Response direction: the upstream task takes
//! `resp_budget` permits before forwarding a chunk and only then releases h2
//! receive capacity; the edge returns the permits as quiche accepts the bytes.
//!
//! Each direction starts with a small grant (`limits.initial_body_buffer_bytes`)
//! and grows (doubling, up to `limits.max_body_buffer_bytes`) only when the
//! grant itself is what holds the stream back: the producer is waiting for
//! permits while the consumer has taken everything buffered. Growth beyond
//! the initial grant is charged to the connection's and the worker's budgets
//! (`limits.max_connection_buffer_bytes`, `limits.max_worker_buffer_bytes`),
//! which the edge keeps; a stream whose growth is refused keeps working with
//! what it has. So a client that stops reading pins at most its streams'
//! grants, and every stream can always move at least its initial grant.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use quiche::h3::Header;
use tokio::sync::{mpsc, Semaphore};
use tokio_util::sync::CancellationToken;

/// Identifies one request stream on one worker's edge; `serial` guards
/// against a recycled slab slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RequestKey {
    pub slot: usize,
    pub serial: u64,
}

/// Request body events, edge → upstream.
#[derive(Debug)]
pub enum ToUpstream {
    Data(Bytes),
    Trailers(http::HeaderMap),
    End,
}

/// Response events, upstream → edge.
#[derive(Debug)]
pub enum ToEdge {
    /// Response head, already mapped to HTTP/3.
    Headers {
        head: super::ResponseHead,
        /// From sending the request to the backend until this head
        /// arrived: the access log's `upstream_ms`.
        head_after: std::time::Duration,
    },
    /// Body bytes; the edge returns exactly `len()` permits to `resp_budget`
    /// once quiche has taken them.
    Data(Bytes),
    Trailers(Vec<Header>),
    End,
    /// The request failed before a response head was forwarded: the edge
    /// answers with this status.
    Fail {
        status: u16,
        reason: String,
        /// `retry-after` seconds for load-shedding 503s.
        retry_after: Option<u32>,
    },
    /// The request failed after the head was forwarded: the edge resets the
    /// client stream with this HTTP/3 error code (never a truncated 200).
    Reset {
        code: u64,
    },
    /// Request-body permits were returned: the edge may read more.
    RequestCredit,
    /// Which backend serves the request, for the access log.
    Backend {
        upstream: String,
        backend: std::net::SocketAddr,
    },
}

/// State both sides of a request hold.
#[derive(Debug)]
pub struct StreamShared {
    pub req_budget: Semaphore,
    pub resp_budget: Semaphore,
    /// Permits `req_budget` was created with plus every growth since.
    pub req_grant: AtomicUsize,
    /// Permits `resp_budget` was created with plus every growth since.
    pub resp_grant: AtomicUsize,
    /// Set by the upstream task while it waits for `resp_budget` permits
    /// with response bytes in hand: tells the edge the grant is the
    /// bottleneck (see [`StreamShared::grow_resp`]).
    pub resp_starved: AtomicBool,
    /// Fired by the edge when the client or its connection goes away.
    pub cancel: CancellationToken,
    /// HTTP/3 error code the client used, for logs (0 = none).
    pub cancel_code: AtomicU64,
    /// Body byte counts for the access log.
    pub bytes_up: AtomicU64,
    pub bytes_down: AtomicU64,
}

impl StreamShared {
    /// Both directions start with `initial` permits (bytes).
    pub fn new(initial: usize) -> Arc<Self> {
        let initial = initial.clamp(1, Semaphore::MAX_PERMITS);
        Arc::new(Self {
            req_budget: Semaphore::new(initial),
            resp_budget: Semaphore::new(initial),
            req_grant: AtomicUsize::new(initial),
            resp_grant: AtomicUsize::new(initial),
            resp_starved: AtomicBool::new(false),
            cancel: CancellationToken::new(),
            cancel_code: AtomicU64::new(0),
            bytes_up: AtomicU64::new(0),
            bytes_down: AtomicU64::new(0),
        })
    }

    pub fn cancel_with(&self, code: u64) {
        self.cancel_code.store(code, Ordering::Relaxed);
        self.cancel.cancel();
    }

    /// Largest response piece the upstream task forwards at once: half the
    /// grant, so the edge can write one piece while the next is on its way.
    pub fn resp_piece(&self) -> usize {
        (self.resp_grant.load(Ordering::Relaxed) / 2).max(1)
    }

    /// How much a grant of `grant` may grow now: doubling, capped by the
    /// stream ceiling `max` and by `room` (what the connection and worker
    /// budgets have left).
    pub fn growth(grant: usize, max: usize, room: usize) -> usize {
        grant
            .min(max.saturating_sub(grant))
            .min(room)
            .min(Semaphore::MAX_PERMITS.saturating_sub(grant))
    }

    /// Adds `extra` response permits; returns what was added.
    pub fn grow_resp(&self, extra: usize) -> usize {
        if extra > 0 {
            self.resp_grant.fetch_add(extra, Ordering::Relaxed);
            self.resp_budget.add_permits(extra);
        }
        extra
    }

    /// Adds `extra` request permits; returns what was added.
    pub fn grow_req(&self, extra: usize) -> usize {
        if extra > 0 {
            self.req_grant.fetch_add(extra, Ordering::Relaxed);
            self.req_budget.add_permits(extra);
        }
        extra
    }
}

/// Sends events for one request to the edge.
#[derive(Debug, Clone)]
pub struct EdgeSender {
    pub key: RequestKey,
    pub tx: mpsc::UnboundedSender<(RequestKey, ToEdge)>,
}

impl EdgeSender {
    /// Sends an event to the edge; false when the worker is shutting down.
    pub fn send(&self, msg: ToEdge) -> bool {
        self.tx.send((self.key, msg)).is_ok()
    }
}

/// The upstream task's half of a request.
#[derive(Debug)]
pub struct UpstreamSide {
    pub shared: Arc<StreamShared>,
    pub body: mpsc::UnboundedReceiver<ToUpstream>,
    pub edge: EdgeSender,
    /// The per-stream ceiling (`limits.max_body_buffer_bytes`); pieces are
    /// cut to [`StreamShared::resp_piece`], never above this.
    pub budget: usize,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_start_with_the_initial_grant() {
        let s = StreamShared::new(16 * 1024);
        assert_eq!(s.resp_budget.available_permits(), 16 * 1024);
        assert_eq!(s.req_budget.available_permits(), 16 * 1024);
        assert_eq!(s.resp_piece(), 8 * 1024);
    }

    #[test]
    fn growth_doubles_up_to_the_ceiling_and_the_room_left() {
        assert_eq!(StreamShared::growth(16, 1024, 1 << 20), 16);
        assert_eq!(StreamShared::growth(768, 1024, 1 << 20), 256);
        assert_eq!(StreamShared::growth(1024, 1024, 1 << 20), 0);
        assert_eq!(StreamShared::growth(64, 1024, 10), 10);
        assert_eq!(StreamShared::growth(64, 1024, 0), 0);
    }

    #[test]
    fn growing_adds_permits_and_widens_pieces() {
        let s = StreamShared::new(1000);
        assert_eq!(s.grow_resp(1000), 1000);
        assert_eq!(s.resp_budget.available_permits(), 2000);
        assert_eq!(s.resp_piece(), 1000);
        assert_eq!(s.grow_req(0), 0);
        assert_eq!(s.req_grant.load(Ordering::Relaxed), 1000);
    }
}
