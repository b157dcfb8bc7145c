//! The seam between a front (the HTTP/3 edge today) and the request path
//! that carries requests to backends: plain values both ways, exchanged by
//! the worker loop. Nothing here is HTTP/3-specific, so a second front (an
//! HTTP/1.1 + HTTP/2 listener over TCP) can hand requests over the same way.
//!
//! Front → request path ([`RequestEvent`]): a request's envelope, then its
//! body (chunks, trailers, end), credit for the response bytes the client
//! took, and cancellation. Request path → front ([`ToEdge`]): the response
//! head, body, trailers and end, or a failure, plus credit for request body
//! bytes the backend took.
//!
//! Budgets are integers, each owned by one side: the front owns the request
//! body's (it reads from the client only while it has credit, and gets
//! credit back once h2 granted capacity and took the bytes), the request
//! path owns the response's (it forwards a piece only with credit in hand,
//! and gets credit back as the client's transport takes the bytes). So the
//! client's window only opens as fast as the backend's does, and the
//! backend's only as fast as the client reads.
//!
//! Each direction starts with a small grant (`limits.initial_body_buffer_bytes`)
//! and grows (doubling, up to `limits.max_body_buffer_bytes`) only when the
//! grant itself is what holds the stream back: the producer waits for credit
//! while the consumer has taken everything buffered. Growth beyond the
//! initial grant is charged to the connection's and the worker's budgets
//! (`limits.max_connection_buffer_bytes`, `limits.max_worker_buffer_bytes`),
//! which the front keeps; a stream whose growth is refused keeps working with
//! what it has. So a client that stops reading pins at most its streams'
//! grants, and every stream can always move at least its initial grant.

use bytes::Bytes;
use quiche::h3::Header;

/// Identifies one request on one worker's front; `serial` guards against a
/// recycled slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RequestKey {
    pub slot: usize,
    pub serial: u64,
}

/// Request body events, front → request path.
#[derive(Debug)]
pub enum ToUpstream {
    /// Body bytes; the front spent that much of its request credit.
    Data(Bytes),
    Trailers(http::HeaderMap),
    End,
}

/// What a front hands the request path, per request, in order: `Head`
/// first, then any of the others.
#[derive(Debug)]
pub enum RequestEvent {
    /// A new request.
    Head {
        envelope: Box<super::Envelope>,
        /// The connection's span: the request span is its child.
        conn_span: tracing::Span,
    },
    Body(ToUpstream),
    /// The client's transport took this many response bytes: the request
    /// path may forward that many more.
    ResponseCredit(usize),
    /// The response grant grew by this many bytes (credit and the size of
    /// the pieces forwarded both grow).
    ResponseGrant(usize),
    /// The request is over for the front (the client went away, the stream
    /// was reset, or the response is complete): stop, and reset the backend
    /// stream with CANCEL if it is still open.
    Cancel,
}

/// Response events, request path → front.
#[derive(Debug)]
pub enum ToEdge {
    /// Response head, already mapped to HTTP/3.
    Headers {
        head: super::ResponseHead,
        /// From sending the request to the backend until this head
        /// arrived: the access log's `upstream_ms`.
        head_after: std::time::Duration,
    },
    /// Body bytes, paid for with response credit; the front gives that
    /// credit back ([`RequestEvent::ResponseCredit`]) once the client's
    /// transport took them.
    Data(Bytes),
    Trailers(Vec<Header>),
    End,
    /// The request failed before a response head was forwarded: the front
    /// answers with this status.
    Fail {
        status: u16,
        reason: String,
        /// `retry-after` seconds for load-shedding 503s.
        retry_after: Option<u32>,
    },
    /// The request failed after the head was forwarded: the front resets the
    /// client stream with this HTTP/3 error code (never a truncated 200).
    Reset {
        code: u64,
    },
    /// The backend took this many request body bytes: the front may read
    /// that many more from the client.
    RequestCredit(usize),
    /// The request path waits for response credit with bytes in hand: once
    /// the client took everything buffered, the grant is the bottleneck.
    Starved,
    /// Which backend serves the request, for the access log.
    Backend {
        upstream: String,
        backend: std::net::SocketAddr,
    },
}

/// How much a grant of `grant` bytes may grow now: doubling, capped by the
/// stream ceiling `max` and by `room` (what the connection and worker
/// budgets have left).
pub fn growth(grant: usize, max: usize, room: usize) -> usize {
    grant.min(max.saturating_sub(grant)).min(room)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn growth_doubles_up_to_the_ceiling_and_the_room_left() {
        assert_eq!(growth(16, 1024, 1 << 20), 16);
        assert_eq!(growth(768, 1024, 1 << 20), 256);
        assert_eq!(growth(1024, 1024, 1 << 20), 0);
        assert_eq!(growth(64, 1024, 10), 10);
        assert_eq!(growth(64, 1024, 0), 0);
    }
}
