//! USDT probes, provider `spooky` (SystemTap SDT notes via the `probe` crate).
//!
//! `bpftrace -l 'usdt:/path/to/spooky:spooky:*'` lists them; the scripts in
//! `ebpf-probes/` and the argument tables in `docs/probes.md` use them.
//!
//! Every probe is `probe_lazy!` in its own non-inlined function (one SDT
//! note per probe, never a stray copy in code the linker dropped): a call,
//! one volatile load of the probe's semaphore
//! and a not-taken branch while nobody is attached. Arguments, C strings
//! included, are only built once a tracer has raised the semaphore, so these
//! functions are safe to call on the hot path. Arguments are plain integers
//! (durations in microseconds) and pointers to NUL-terminated strings that
//! live until the probe has fired (`str(argN)` in bpftrace).
//!
//! The argument order of each probe is part of the contract in DESIGN.md:
//! change it only together with `ebpf-probes/` and `docs/probes.md`.

use std::ffi::{c_char, CStr, CString};
use std::fmt::Display;
use std::time::Duration;

use probe::probe_lazy;

/// Names of every probe, in the order of `docs/probes.md`; the end-to-end
/// test checks that `bpftrace -l` lists each one.
pub const PROBE_NAMES: [&str; 12] = [
    "conn_accept",
    "conn_close",
    "handshake_done",
    "request_start",
    "request_routed",
    "upstream_response",
    "request_done",
    "retry",
    "backend_state",
    "io_recv_batch",
    "io_send_batch",
    "config_reload",
];

/// Microseconds, saturating, as probe arguments carry them.
fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// Renders `v` into `slot` as a C string and returns a pointer into it; the
/// pointer stays valid while `slot` lives (the caller's frame, so across the
/// probe). An interior NUL (impossible for names validated by the config)
/// yields an empty string rather than a truncated one.
fn c_string(slot: &mut Option<CString>, v: impl Display) -> *const c_char {
    slot.insert(CString::new(v.to_string()).unwrap_or_default())
        .as_ptr()
}

/// The I/O driver's name (`caps.driver`) as a static C string.
fn driver_cstr(driver: &str) -> &'static CStr {
    match driver {
        "uring" | "io_uring" => c"uring",
        "epoll" => c"epoll",
        _ => c"other",
    }
}

/// Why a QUIC connection ended, as `conn_close` and the
/// `spooky_quic_connections_closed_by_reason_total` family name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// Closed before the handshake completed.
    HandshakeFailed,
    /// No packet for `quic.idle_timeout_ms`.
    IdleTimeout,
    /// The client closed it with NO_ERROR.
    PeerClosed,
    /// The client closed it with an error code.
    PeerError,
    /// spooky closed it with NO_ERROR (drain, GOAWAY).
    LocalClosed,
    /// spooky closed it with an error code.
    LocalError,
}

impl CloseReason {
    pub const ALL: [CloseReason; 6] = [
        CloseReason::HandshakeFailed,
        CloseReason::IdleTimeout,
        CloseReason::PeerClosed,
        CloseReason::PeerError,
        CloseReason::LocalClosed,
        CloseReason::LocalError,
    ];

    /// Classifies a closed connection.
    pub fn of(quic: &quiche::Connection, established: bool) -> Self {
        if !established {
            return CloseReason::HandshakeFailed;
        }
        if quic.is_timed_out() {
            return CloseReason::IdleTimeout;
        }
        if let Some(e) = quic.peer_error() {
            return if is_clean(e) {
                CloseReason::PeerClosed
            } else {
                CloseReason::PeerError
            };
        }
        match quic.local_error() {
            Some(e) if !is_clean(e) => CloseReason::LocalError,
            _ => CloseReason::LocalClosed,
        }
    }

    pub fn as_cstr(self) -> &'static CStr {
        match self {
            CloseReason::HandshakeFailed => c"handshake_failed",
            CloseReason::IdleTimeout => c"idle_timeout",
            CloseReason::PeerClosed => c"peer_closed",
            CloseReason::PeerError => c"peer_error",
            CloseReason::LocalClosed => c"local_closed",
            CloseReason::LocalError => c"local_error",
        }
    }

    pub fn as_str(self) -> &'static str {
        // Every literal above is ASCII.
        self.as_cstr().to_str().unwrap_or("unknown")
    }
}

/// HTTP/3's H3_NO_ERROR: an application close that is not an error.
const H3_NO_ERROR: u64 = 0x100;

/// A close without error: transport NO_ERROR or HTTP/3 H3_NO_ERROR.
fn is_clean(e: &quiche::ConnectionError) -> bool {
    if e.is_app {
        e.error_code == H3_NO_ERROR
    } else {
        e.error_code == 0
    }
}

/// `conn_accept(conn, peer)`: a connection was accepted; `conn` is the
/// worker-local serial the other connection probes carry.
#[inline(never)]
pub fn conn_accept(conn: u64, peer: &std::net::SocketAddr) {
    let mut p = None;
    probe_lazy!(spooky, conn_accept, conn, c_string(&mut p, peer));
}

/// `conn_close(conn, reason, packets_lost, packets_sent, rtt_us)`.
#[inline(never)]
pub fn conn_close(conn: u64, reason: CloseReason, lost: usize, sent: usize, rtt: Duration) {
    probe_lazy!(
        spooky,
        conn_close,
        conn,
        reason.as_cstr().as_ptr(),
        lost,
        sent,
        micros(rtt)
    );
}

/// `handshake_done(conn, duration_us)`: from the first Initial to established.
#[inline(never)]
pub fn handshake_done(conn: u64, took: Duration) {
    probe_lazy!(spooky, handshake_done, conn, micros(took));
}

/// `request_start(request_id, conn, stream_id)`.
#[inline(never)]
pub fn request_start(request_id: u64, conn: u64, stream_id: u64) {
    probe_lazy!(spooky, request_start, request_id, conn, stream_id);
}

/// `request_routed(request_id, upstream, backend)`: the balancer picked
/// `backend` (`ip:port`) of `upstream`; fires once per attempt.
#[inline(never)]
pub fn request_routed(request_id: u64, upstream: &str, backend: &std::net::SocketAddr) {
    let (mut u, mut b) = (None, None);
    probe_lazy!(
        spooky,
        request_routed,
        request_id,
        c_string(&mut u, upstream),
        c_string(&mut b, backend)
    );
}

/// `upstream_response(request_id, status, latency_us, backend)`: a
/// backend's response head arrived, `latency_us` after the request was sent.
#[inline(never)]
pub fn upstream_response(
    request_id: u64,
    status: u16,
    latency: Duration,
    backend: &std::net::SocketAddr,
) {
    let mut b = None;
    probe_lazy!(
        spooky,
        upstream_response,
        request_id,
        status,
        micros(latency),
        c_string(&mut b, backend)
    );
}

/// `request_done(request_id, status, bytes_out, duration_us, bytes_in)`:
/// status 0 = reset or aborted before a status was sent.
#[inline(never)]
pub fn request_done(request_id: u64, status: u16, bytes_out: u64, took: Duration, bytes_in: u64) {
    probe_lazy!(
        spooky,
        request_done,
        request_id,
        status,
        bytes_out,
        micros(took),
        bytes_in
    );
}

/// `retry(request_id, upstream, backend, attempt)`: the attempt on
/// `backend` failed and the request goes to another one.
#[inline(never)]
pub fn retry(request_id: u64, upstream: &str, backend: &std::net::SocketAddr, attempt: usize) {
    let (mut u, mut b) = (None, None);
    probe_lazy!(
        spooky,
        retry,
        request_id,
        c_string(&mut u, upstream),
        c_string(&mut b, backend),
        attempt
    );
}

/// What `backend_state` reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendEvent {
    Healthy,
    Unhealthy,
    Ejected,
}

impl BackendEvent {
    fn as_cstr(self) -> &'static CStr {
        match self {
            BackendEvent::Healthy => c"healthy",
            BackendEvent::Unhealthy => c"unhealthy",
            BackendEvent::Ejected => c"ejected",
        }
    }
}

impl From<super::backends::HealthState> for BackendEvent {
    fn from(h: super::backends::HealthState) -> Self {
        match h {
            super::backends::HealthState::Unhealthy => BackendEvent::Unhealthy,
            // A check result never moves a backend back to "unknown".
            _ => BackendEvent::Healthy,
        }
    }
}

/// `backend_state(upstream, backend, state, ejected_for_ms)`: an active
/// health check changed a backend's state, or outlier detection ejected it.
#[inline(never)]
pub fn backend_state(
    upstream: &str,
    backend: &std::net::SocketAddr,
    state: BackendEvent,
    ejected_for: Duration,
) {
    let (mut u, mut b) = (None, None);
    probe_lazy!(
        spooky,
        backend_state,
        c_string(&mut u, upstream),
        c_string(&mut b, backend),
        state.as_cstr().as_ptr(),
        u64::try_from(ejected_for.as_millis()).unwrap_or(u64::MAX)
    );
}

/// `io_recv_batch(datagrams, bytes, driver)`: one receive call's yield.
#[inline(never)]
pub fn io_recv_batch(datagrams: usize, bytes: usize, driver: &str) {
    probe_lazy!(
        spooky,
        io_recv_batch,
        datagrams,
        bytes,
        driver_cstr(driver).as_ptr()
    );
}

/// `io_send_batch(datagrams, bytes, driver)`: one send (a GSO train).
#[inline(never)]
pub fn io_send_batch(datagrams: usize, bytes: usize, driver: &str) {
    probe_lazy!(
        spooky,
        io_send_batch,
        datagrams,
        bytes,
        driver_cstr(driver).as_ptr()
    );
}

/// `config_reload(ok, generation)`: ok 1 = applied (generation is the new
/// one), 0 = rejected (generation is the one still in effect).
#[inline(never)]
pub fn config_reload(ok: bool, generation: u64) {
    probe_lazy!(spooky, config_reload, u64::from(ok), generation);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn c_strings_hold_their_text() {
        let mut slot = None;
        let p = c_string(&mut slot, "127.0.0.1:9001");
        // SAFETY: `p` points into `slot`, alive and NUL-terminated.
        let s = unsafe { CStr::from_ptr(p) };
        assert_eq!(s.to_str().ok(), Some("127.0.0.1:9001"));
        let p = c_string(&mut slot, "a\0b");
        // SAFETY: as above.
        assert_eq!(unsafe { CStr::from_ptr(p) }.to_bytes(), b"");
    }

    #[test]
    fn unattached_probes_do_not_evaluate() {
        // No tracer is attached in unit tests: the semaphore is zero.
        let mut evaluated = false;
        let fired = probe_lazy!(spooky, unit_test_probe, {
            evaluated = true;
            1u64
        });
        assert!(!fired && !evaluated);
    }

    #[test]
    fn names_and_drivers() {
        assert_eq!(driver_cstr("uring"), c"uring");
        assert_eq!(driver_cstr("epoll"), c"epoll");
        assert_eq!(CloseReason::IdleTimeout.as_str(), "idle_timeout");
        let seen: std::collections::BTreeSet<_> =
            CloseReason::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(seen.len(), CloseReason::ALL.len());
        assert_eq!(PROBE_NAMES.len(), 12);
    }
}
