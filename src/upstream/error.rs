//! One error type for the request path (after pingora-error): what went
//! wrong, whose doing it was, whether it may be retried, and the original
//! cause (`h2::Error`, `io::Error`, …) kept as its source.
//!
//! Everything that acts on a failure reads it from here: the client's
//! status ([`UpstreamError::status`]), the HTTP/3 reset code once a head
//! was forwarded ([`UpstreamError::h3_reset_code`]), the retry decision
//! ([`UpstreamError::retry_on`], [`UpstreamError::unprocessed`]) and outlier
//! detection ([`UpstreamError::counts_against_backend`]). So "only backend
//! errors count" is a property of the type, not of flags set by hand at
//! each call site.

use std::net::SocketAddr;
use std::time::Duration;

use crate::config::RetryOn;
use crate::edge::h3_code;

/// Which side of the proxy an error belongs to: only `Backend` errors may
/// count against a backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorSide {
    /// What the client sent or did (malformed request, no route, went away).
    Client,
    /// spooky's own state: no backend available, queues full.
    Spooky,
    /// What a backend did: refused, reset, timed out, failed to connect, 5xx.
    Backend,
}

/// The original failure behind an [`UpstreamError`].
#[derive(Debug, thiserror::Error)]
pub enum Cause {
    #[error(transparent)]
    H2(#[from] h2::Error),
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Http(#[from] http::Error),
    /// A failure seen earlier (and logged then), repeated to requests that
    /// did not see it themselves: a pool backing off after failed connects.
    #[error("{0}")]
    Earlier(String),
    /// A state with no error value behind it (a stream that closed).
    #[error("{0}")]
    Closed(&'static str),
}

/// Why a request could not be carried to a backend or back.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("no route for host {host} path {path}")]
    NoRoute { host: String, path: String },
    #[error("upstream {upstream} has no healthy backend")]
    NoBackend { upstream: String },
    #[error("upstream {upstream} is saturated (circuit breaking)")]
    Saturated { upstream: String },
    #[error("backend answered {0}, retries exhausted")]
    Status(u16),
    #[error("connect to {backend} failed: {cause}")]
    Connect {
        backend: SocketAddr,
        #[source]
        cause: Cause,
    },
    #[error("connect to {backend} timed out")]
    ConnectTimeout { backend: SocketAddr },
    #[error("no free stream to {backend} before the deadline")]
    PoolTimeout { backend: SocketAddr },
    #[error("too many requests already wait for a stream to {backend} (circuit.max_pending)")]
    PoolFull { backend: SocketAddr },
    /// REFUSED_STREAM, or a GOAWAY below our stream: the backend did not
    /// process the request.
    #[error("backend refused the stream ({0})")]
    Refused(#[source] h2::Error),
    #[error("backend failed before responding: {0}")]
    BeforeResponse(#[source] h2::Error),
    #[error("no response within {0:?}")]
    Timeout(Duration),
    #[error("backend reset the response: {0}")]
    ResponseReset(#[source] Cause),
    #[error("response body stalled for {0:?}")]
    Idle(Duration),
    #[error("client went away")]
    Cancelled,
    /// The HTTP/2 library refused the mapped request before sending it (a
    /// header the mapping let through): the client's request, never a
    /// backend's failure.
    #[error("request refused before sending: {0}")]
    RefusedLocally(#[source] Cause),
    /// The client stopped reading: response bytes waited for its budget for
    /// this long. The client's fault: never charged to the backend, never
    /// retried.
    #[error("client stopped reading for {0:?}")]
    ClientStalled(Duration),
    /// The client stopped sending its request body: the backend waited for
    /// it (no response head within `timeouts.request_ms`, or no body bytes
    /// for `timeouts.idle_ms`). The client's fault: answered 408, never
    /// charged to the backend, never retried.
    #[error("client stopped sending its request body for {0:?}")]
    ClientBodyStalled(Duration),
}

impl UpstreamError {
    /// Seconds a client should wait before trying again, for 503s caused by
    /// load rather than by failure.
    pub fn retry_after(&self) -> Option<u32> {
        match self {
            UpstreamError::Saturated { .. }
            | UpstreamError::PoolTimeout { .. }
            | UpstreamError::PoolFull { .. } => Some(1),
            UpstreamError::NoBackend { .. } => Some(5),
            _ => None,
        }
    }

    /// Who caused this error.
    pub fn side(&self) -> ErrorSide {
        match self {
            UpstreamError::NoRoute { .. }
            | UpstreamError::Cancelled
            | UpstreamError::ClientStalled(_)
            | UpstreamError::ClientBodyStalled(_)
            | UpstreamError::RefusedLocally(_) => ErrorSide::Client,
            UpstreamError::NoBackend { .. }
            | UpstreamError::Saturated { .. }
            | UpstreamError::PoolTimeout { .. }
            | UpstreamError::PoolFull { .. } => ErrorSide::Spooky,
            UpstreamError::Status(_)
            | UpstreamError::Connect { .. }
            | UpstreamError::ConnectTimeout { .. }
            | UpstreamError::Refused(_)
            | UpstreamError::BeforeResponse(_)
            | UpstreamError::Timeout(_)
            | UpstreamError::ResponseReset(_)
            | UpstreamError::Idle(_) => ErrorSide::Backend,
        }
    }

    /// The status sent to the client when no response head was forwarded yet.
    pub fn status(&self) -> u16 {
        match self {
            UpstreamError::NoRoute { .. } => 404,
            UpstreamError::NoBackend { .. }
            | UpstreamError::PoolTimeout { .. }
            | UpstreamError::PoolFull { .. }
            | UpstreamError::Saturated { .. } => 503,
            UpstreamError::Status(s) => *s,
            UpstreamError::Connect { .. }
            | UpstreamError::ConnectTimeout { .. }
            | UpstreamError::Refused(_)
            | UpstreamError::BeforeResponse(_)
            | UpstreamError::ResponseReset(_) => 502,
            UpstreamError::Timeout(_) | UpstreamError::Idle(_) => 504,
            UpstreamError::Cancelled | UpstreamError::ClientStalled(_) => 499,
            UpstreamError::RefusedLocally(_) => 400,
            UpstreamError::ClientBodyStalled(_) => 408,
        }
    }

    /// The HTTP/3 error code the client's stream is reset with when the
    /// failure comes after its response head was forwarded (never a
    /// truncated 200).
    pub fn h3_reset_code(&self) -> u64 {
        match (self, self.side()) {
            (UpstreamError::RefusedLocally(_), _) => h3_code::MESSAGE_ERROR,
            (_, ErrorSide::Client) => h3_code::REQUEST_CANCELLED,
            _ => h3_code::INTERNAL_ERROR,
        }
    }

    /// The `retries.on` condition this failure matches, if any. A retry
    /// also needs the request to be safe to send again (see
    /// [`UpstreamError::unprocessed`]).
    pub fn retry_on(&self) -> Option<RetryOn> {
        match self {
            UpstreamError::Connect { .. } | UpstreamError::ConnectTimeout { .. } => {
                Some(RetryOn::ConnectFailure)
            }
            UpstreamError::Refused(_) => Some(RetryOn::RefusedStream),
            UpstreamError::BeforeResponse(_) => Some(RetryOn::Reset),
            UpstreamError::Status(s) => Some(RetryOn::Status(*s)),
            _ => None,
        }
    }

    /// The backend provably did not process the request (nothing was sent,
    /// or it refused the stream): safe to send again whatever the method.
    pub fn unprocessed(&self) -> bool {
        matches!(
            self,
            UpstreamError::Connect { .. }
                | UpstreamError::ConnectTimeout { .. }
                | UpstreamError::PoolTimeout { .. }
                | UpstreamError::PoolFull { .. }
                | UpstreamError::Refused(_)
        )
    }

    /// Counts toward the backend's outlier detection. Only backend-side
    /// errors ever do, and not all of them: a refused stream is load
    /// shedding or a graceful shutdown, and a stalled response body may be
    /// held up by the client's own window, neither proof of sickness.
    pub fn counts_against_backend(&self) -> bool {
        match self {
            UpstreamError::Connect { .. }
            | UpstreamError::ConnectTimeout { .. }
            | UpstreamError::BeforeResponse(_)
            | UpstreamError::Timeout(_)
            | UpstreamError::ResponseReset(_) => true,
            UpstreamError::Status(s) => *s >= 500,
            _ => false,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use std::error::Error as _;

    use super::*;

    fn every_kind() -> Vec<UpstreamError> {
        let backend = SocketAddr::from(([127, 0, 0, 1], 9));
        let d = Duration::from_secs(1);
        let h2 = || h2::Error::from(h2::Reason::INTERNAL_ERROR);
        vec![
            UpstreamError::NoRoute {
                host: "h".into(),
                path: "/".into(),
            },
            UpstreamError::NoBackend {
                upstream: "app".into(),
            },
            UpstreamError::Saturated {
                upstream: "app".into(),
            },
            UpstreamError::Status(503),
            UpstreamError::Status(404),
            UpstreamError::Connect {
                backend,
                cause: Cause::Io(std::io::ErrorKind::ConnectionRefused.into()),
            },
            UpstreamError::ConnectTimeout { backend },
            UpstreamError::PoolTimeout { backend },
            UpstreamError::PoolFull { backend },
            UpstreamError::Refused(h2::Error::from(h2::Reason::REFUSED_STREAM)),
            UpstreamError::BeforeResponse(h2()),
            UpstreamError::Timeout(d),
            UpstreamError::ResponseReset(Cause::H2(h2())),
            UpstreamError::Idle(d),
            UpstreamError::Cancelled,
            UpstreamError::RefusedLocally(Cause::Closed("x")),
            UpstreamError::ClientStalled(d),
            UpstreamError::ClientBodyStalled(d),
        ]
    }

    #[test]
    fn only_backend_errors_ever_count_against_a_backend() {
        for e in every_kind() {
            if e.counts_against_backend() {
                assert_eq!(e.side(), ErrorSide::Backend, "{e}");
            }
            if e.side() != ErrorSide::Backend {
                assert_eq!(e.retry_on(), None, "{e}: never retried");
            }
        }
    }

    #[test]
    fn client_errors_answer_4xx_and_reset_without_blaming_spooky() {
        for e in every_kind()
            .into_iter()
            .filter(|e| e.side() == ErrorSide::Client)
        {
            assert!((400..500).contains(&e.status()), "{e}: {}", e.status());
            assert_ne!(e.h3_reset_code(), h3_code::INTERNAL_ERROR, "{e}");
        }
    }

    #[test]
    fn the_original_cause_is_kept_as_the_source() {
        let e = UpstreamError::Connect {
            backend: SocketAddr::from(([127, 0, 0, 1], 9)),
            cause: Cause::Io(std::io::ErrorKind::ConnectionRefused.into()),
        };
        let io = e
            .source()
            .and_then(|s| s.downcast_ref::<Cause>())
            .and_then(|c| match c {
                Cause::Io(io) => Some(io.kind()),
                _ => None,
            });
        assert_eq!(io, Some(std::io::ErrorKind::ConnectionRefused));
        let e = UpstreamError::Refused(h2::Error::from(h2::Reason::REFUSED_STREAM));
        let reason = e
            .source()
            .and_then(|s| s.downcast_ref::<h2::Error>())
            .and_then(h2::Error::reason);
        assert_eq!(reason, Some(h2::Reason::REFUSED_STREAM));
    }
}
