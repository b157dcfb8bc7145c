//! The stream router: turns an HTTP/3 request header section into a
//! normalised [`Envelope`] (RFC 9114 §4 in, RFC 9113 §8 out), maps HTTP/2
//! response headers back to HTTP/3, and picks an upstream by host and path.
//!
//! Pure functions and plain data: no sockets, no clocks beyond the `now`
//! passed in, so every rule here is unit-tested in isolation.
// No clock or randomness outside tests: see clippy.toml.
#![cfg_attr(not(test), deny(clippy::disallowed_methods))]

pub mod bridge;
pub mod headers;
pub mod routes;

use std::net::SocketAddr;
use std::time::Instant;

pub use headers::{build_envelope, trailers_from_h2, trailers_to_h3, ResponseHead};
pub use routes::RouteTable;

/// Why a request could not become an envelope.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// Malformed per RFC 9114 §4.1.2: the stream is reset with H3_MESSAGE_ERROR.
    #[error("malformed request: {0}")]
    Malformed(MalformedRequest),
    /// Well-formed but refused with an HTTP status (431, 400 …).
    #[error("request refused with {status}: {reason}")]
    Refused { status: u16, reason: String },
    /// Well-formed but a kind of request spooky does not carry (CONNECT,
    /// RFC 9114 §4.4): the stream is reset with H3_REQUEST_REJECTED, which
    /// tells the client nothing was processed and another server may serve it.
    #[error("request rejected: {0}")]
    Rejected(&'static str),
}

/// A malformed request: which rule it broke (a bounded label for
/// `spooky_requests_malformed_total{reason}`) and the detail for the log.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{detail} ({})", reason.as_str())]
pub struct MalformedRequest {
    pub reason: MalformedReason,
    pub detail: String,
}

impl MalformedRequest {
    pub fn new(reason: MalformedReason, detail: impl Into<String>) -> Self {
        Self {
            reason,
            detail: detail.into(),
        }
    }
}

/// The rule a malformed request broke. Closed and small, so it can label a
/// metric without letting clients grow its cardinality.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MalformedReason {
    /// Missing, duplicate, unknown or misplaced pseudo-header (RFC 9114 §4.3).
    PseudoHeader,
    /// Uppercase or otherwise invalid field name (RFC 9114 §4.2).
    HeaderName,
    /// Field value with bytes RFC 9110 §5.5 forbids (NUL, CR, LF, controls).
    HeaderValue,
    /// Connection-specific field (RFC 9114 §4.2, RFC 9113 §8.2.2).
    ConnectionSpecific,
    /// `te` other than `trailers` (RFC 9113 §8.2.2).
    Te,
    /// `content-length` not digits only, or values that disagree (RFC 9110 §8.6).
    ContentLength,
    /// Body bytes disagree with `content-length` (RFC 9114 §4.1.2).
    BodyLength,
    /// `:method` not a token, or `:protocol` outside extended CONNECT.
    Method,
    /// `:scheme` other than `http` or `https`.
    Scheme,
    /// `:path` empty, not origin-form, or with characters RFC 3986 forbids.
    Path,
    /// `:authority`/`host` missing, invalid or disagreeing (RFC 9114 §4.3.1).
    Authority,
    /// Pseudo-header or invalid field in trailers (RFC 9114 §4.1.2).
    Trailers,
    /// The HTTP/2 library refused the mapped request before sending it: a
    /// request the mapping should have caught; never a backend's fault.
    RefusedLocally,
}

impl MalformedReason {
    pub const ALL: [MalformedReason; 13] = [
        MalformedReason::PseudoHeader,
        MalformedReason::HeaderName,
        MalformedReason::HeaderValue,
        MalformedReason::ConnectionSpecific,
        MalformedReason::Te,
        MalformedReason::ContentLength,
        MalformedReason::BodyLength,
        MalformedReason::Method,
        MalformedReason::Scheme,
        MalformedReason::Path,
        MalformedReason::Authority,
        MalformedReason::Trailers,
        MalformedReason::RefusedLocally,
    ];

    /// Position in [`Self::ALL`], the index of its per-worker counter.
    pub fn index(self) -> usize {
        self as usize
    }

    pub fn as_str(self) -> &'static str {
        match self {
            MalformedReason::PseudoHeader => "pseudo_header",
            MalformedReason::HeaderName => "header_name",
            MalformedReason::HeaderValue => "header_value",
            MalformedReason::ConnectionSpecific => "connection_specific",
            MalformedReason::Te => "te",
            MalformedReason::ContentLength => "content_length",
            MalformedReason::BodyLength => "body_length",
            MalformedReason::Method => "method",
            MalformedReason::Scheme => "scheme",
            MalformedReason::Path => "path",
            MalformedReason::Authority => "authority",
            MalformedReason::Trailers => "trailers",
            MalformedReason::RefusedLocally => "refused_locally",
        }
    }
}

/// W3C trace context carried with a request (taken from the client's
/// `traceparent` or created here) so one request can be followed end to end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceContext {
    pub trace_id: [u8; 16],
    pub parent_id: [u8; 8],
    pub flags: u8,
}

impl TraceContext {
    /// Parses a `traceparent` value (version 00 layout); `None` if invalid.
    pub fn parse(value: &str) -> Option<Self> {
        let parts: Vec<&str> = value.trim().split('-').collect();
        if parts.len() < 4 || parts[0].len() != 2 || parts[0] == "ff" {
            return None;
        }
        let mut trace_id = [0u8; 16];
        let mut parent_id = [0u8; 8];
        let mut flags = [0u8; 1];
        hex::decode_to_slice(parts[1], &mut trace_id).ok()?;
        hex::decode_to_slice(parts[2], &mut parent_id).ok()?;
        hex::decode_to_slice(parts[3], &mut flags).ok()?;
        if trace_id == [0; 16] || parent_id == [0; 8] {
            return None;
        }
        Some(Self {
            trace_id,
            parent_id,
            flags: flags[0],
        })
    }

    /// A fresh, sampled context.
    pub fn generate(source: &mut dyn crate::source::Source) -> Self {
        let mut trace_id = [0u8; 16];
        let mut parent_id = [0u8; 8];
        source.fill_random(&mut trace_id);
        source.fill_random(&mut parent_id);
        trace_id[0] |= 1; // never all-zero
        parent_id[0] |= 1;
        Self {
            trace_id,
            parent_id,
            flags: 1,
        }
    }

    /// The `traceparent` to send upstream: same trace, spooky's own span as parent.
    pub fn child(&self, source: &mut dyn crate::source::Source) -> Self {
        let mut next = Self::generate(source);
        next.trace_id = self.trace_id;
        next.flags = self.flags;
        next
    }

    pub fn trace_id_hex(&self) -> String {
        hex::encode(self.trace_id)
    }

    pub fn to_header(&self) -> String {
        format!(
            "00-{}-{}-{:02x}",
            hex::encode(self.trace_id),
            hex::encode(self.parent_id),
            self.flags
        )
    }
}

/// One request as the rest of spooky sees it, independent of HTTP version.
#[derive(Debug, Clone)]
pub struct Envelope {
    /// Process-unique id, logged with every line about this request.
    pub request_id: u64,
    pub method: http::Method,
    pub scheme: String,
    /// Host (and port if given), lowercased, from `:authority` or `host`.
    pub authority: String,
    pub path: String,
    /// Regular headers to forward (pseudo-headers and hop-by-hop fields removed,
    /// forwarding headers added).
    pub headers: http::HeaderMap,
    pub client: SocketAddr,
    /// Declared request body length, checked against what arrives.
    pub content_length: Option<u64>,
    /// The client will send a body (the HEADERS frame did not end the stream).
    pub has_body: bool,
    /// Safe to replay (RFC 9110 §9.2.2); the retry logic reads only this.
    pub idempotent: bool,
    pub trace: TraceContext,
    pub received_at: Instant,
}

impl Envelope {
    /// Host without port, for route matching.
    pub fn host(&self) -> &str {
        host_without_port(&self.authority)
    }
}

fn host_without_port(authority: &str) -> &str {
    if let Some(rest) = authority.strip_prefix('[') {
        // [v6]:port
        return rest.split(']').next().unwrap_or(rest);
    }
    authority
        .rsplit_once(':')
        .map(|(h, _)| h)
        .unwrap_or(authority)
}

/// RFC 9110 §9.2.2 idempotent methods.
pub fn is_idempotent(method: &http::Method) -> bool {
    matches!(
        *method,
        http::Method::GET
            | http::Method::HEAD
            | http::Method::OPTIONS
            | http::Method::TRACE
            | http::Method::PUT
            | http::Method::DELETE
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_round_trip_and_rejects_garbage() {
        let v = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let t = TraceContext::parse(v).expect("valid");
        assert_eq!(t.to_header(), v);
        assert_eq!(
            t.child(&mut crate::source::SystemSource).trace_id,
            t.trace_id
        );
        assert_ne!(
            t.child(&mut crate::source::SystemSource).parent_id,
            t.parent_id
        );
        assert!(TraceContext::parse("00-0000-00f067aa0ba902b7-01").is_none());
        assert!(
            TraceContext::parse("ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
                .is_none()
        );
        assert!(
            TraceContext::parse("00-00000000000000000000000000000000-00f067aa0ba902b7-01")
                .is_none()
        );
        assert!(TraceContext::parse("garbage").is_none());
    }

    #[test]
    fn host_strips_port() {
        assert_eq!(host_without_port("example.com:443"), "example.com");
        assert_eq!(host_without_port("example.com"), "example.com");
        assert_eq!(host_without_port("[::1]:8443"), "::1");
    }

    #[test]
    fn malformed_reasons_index_their_slot() {
        for (i, r) in MalformedReason::ALL.iter().enumerate() {
            assert_eq!(r.index(), i, "{}", r.as_str());
        }
    }

    #[test]
    fn idempotency() {
        assert!(is_idempotent(&http::Method::GET));
        assert!(is_idempotent(&http::Method::PUT));
        assert!(!is_idempotent(&http::Method::POST));
        assert!(!is_idempotent(&http::Method::PATCH));
    }
}
