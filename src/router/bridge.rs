//! The channel pair between a request stream on the edge and the upstream
//! task that serves it, with byte budgets that carry backpressure both ways.
//!
//! Request direction: the edge reads body bytes from quiche only while
//! `req_budget` has permits, so the client's QUIC stream window opens only as
//! fast as the upstream task hands bytes to h2 (which returns the permits once
//! h2 granted send capacity). Response direction: the upstream task takes
//! `resp_budget` permits before forwarding a chunk and only then releases h2
//! receive capacity; the edge returns the permits as quiche accepts the bytes.
//! Each direction therefore buffers at most `limits.max_body_buffer_bytes`.

use std::sync::atomic::{AtomicU64, Ordering};
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
    Headers(Vec<Header>),
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
    /// Fired by the edge when the client or its connection goes away.
    pub cancel: CancellationToken,
    /// HTTP/3 error code the client used, for logs (0 = none).
    pub cancel_code: AtomicU64,
    /// Body byte counts for the access log.
    pub bytes_up: AtomicU64,
    pub bytes_down: AtomicU64,
}

impl StreamShared {
    pub fn new(budget: usize) -> Arc<Self> {
        let budget = budget.clamp(1, Semaphore::MAX_PERMITS);
        Arc::new(Self {
            req_budget: Semaphore::new(budget),
            resp_budget: Semaphore::new(budget),
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
    /// Largest chunk that fits the response budget.
    pub budget: usize,
}
