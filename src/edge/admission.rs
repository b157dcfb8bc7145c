//! Admission of new connections: when an Initial gets a stateless Retry
//! instead of connection state, how many connections one worker may hold,
//! and how many new ones per second one client address may open.
//!
//! Everything here is per worker, like the [`super::Edge`] that uses it, and
//! sans-IO: time comes in as an argument.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use crate::config::{Config, RetryMode, Workers};
use crate::telemetry::RetryReason;

/// Length of one rate window of [`SourceRate`].
const RATE_WINDOW: Duration = Duration::from_secs(1);

/// Most client addresses [`SourceRate`] tracks in one window (about 64 bytes
/// each, so at most ~1 MiB per worker). Past it, addresses not yet seen in
/// the window are not limited: a flood from that many addresses is a
/// spoofed-source flood, which Retry (`quic.retry: auto`) already answers
/// without state.
pub const MAX_TRACKED_SOURCES: usize = 16_384;

/// Whether a new connection must first answer a Retry, and why.
///
/// `half_open` counts this worker's connections whose handshake has not
/// completed; under `auto`, Retry starts once it reaches `threshold`, so at
/// most `threshold` connections hold state for unvalidated addresses.
pub fn retry_reason(mode: RetryMode, half_open: usize, threshold: usize) -> Option<RetryReason> {
    match mode {
        RetryMode::Always => Some(RetryReason::Always),
        RetryMode::Never => None,
        RetryMode::Auto => (half_open >= threshold).then_some(RetryReason::HalfOpen),
    }
}

/// This worker's share of the per-process `limits.max_connections`: an
/// equal split (rounded down, at least 1), so the process as a whole never
/// holds more than the configured number, whichever worker the kernel's
/// SO_REUSEPORT hash picks for each client.
pub fn worker_share(cfg: &Config) -> usize {
    let workers = match cfg.io.workers {
        Workers::Auto => std::thread::available_parallelism().map_or(1, |n| n.get()),
        Workers::Count(n) => n,
    }
    // Same clamp as the runtime: the worker id is one octet of the CID.
    .clamp(1, 256);
    (cfg.limits.max_connections / workers).max(1)
}

/// New connections per client IP address in fixed one-second windows
/// (`quic.new_connections_per_source`), in a table of bounded size that is
/// emptied at every window.
#[derive(Debug)]
pub struct SourceRate {
    per_window: u32,
    window_start: Option<Instant>,
    counts: HashMap<IpAddr, u32>,
}

impl SourceRate {
    /// `per_second` = 0 turns the limit off.
    pub fn new(per_second: u32) -> Self {
        Self {
            per_window: per_second,
            window_start: None,
            counts: HashMap::new(),
        }
    }

    /// Changes the limit (a reload); counts so far stay.
    pub fn set_limit(&mut self, per_second: u32) {
        self.per_window = per_second;
    }

    /// Counts one new connection from `ip` at `now`; false when `ip` has
    /// used up its connections for this window (the connection is refused).
    pub fn admit(&mut self, ip: IpAddr, now: Instant) -> bool {
        if self.per_window == 0 {
            return true;
        }
        let expired = self
            .window_start
            .is_none_or(|s| now.saturating_duration_since(s) >= RATE_WINDOW);
        if expired {
            self.window_start = Some(now);
            self.counts.clear();
            // Give back what a burst of many addresses grew the table to.
            self.counts.shrink_to(MAX_TRACKED_SOURCES / 16);
        }
        if let Some(n) = self.counts.get_mut(&ip) {
            if *n >= self.per_window {
                return false;
            }
            *n += 1;
            return true;
        }
        if self.counts.len() < MAX_TRACKED_SOURCES {
            self.counts.insert(ip, 1);
        }
        true
    }

    /// Addresses tracked in the current window.
    pub fn tracked(&self) -> usize {
        self.counts.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(n: u32) -> IpAddr {
        IpAddr::from(n.to_be_bytes())
    }

    #[test]
    fn auto_retries_from_the_threshold_on() {
        assert_eq!(retry_reason(RetryMode::Auto, 99, 100), None);
        assert_eq!(
            retry_reason(RetryMode::Auto, 100, 100),
            Some(RetryReason::HalfOpen)
        );
        assert_eq!(
            retry_reason(RetryMode::Always, 0, 100),
            Some(RetryReason::Always)
        );
        assert_eq!(retry_reason(RetryMode::Never, 1_000_000, 100), None);
    }

    #[test]
    fn source_rate_limits_per_address_per_window() {
        let t0 = Instant::now();
        let mut r = SourceRate::new(3);
        for _ in 0..3 {
            assert!(r.admit(ip(1), t0));
        }
        assert!(!r.admit(ip(1), t0), "fourth in the same second");
        assert!(r.admit(ip(2), t0), "another address has its own count");
        assert!(
            r.admit(ip(1), t0 + RATE_WINDOW),
            "a new window starts afresh"
        );
        let mut off = SourceRate::new(0);
        assert!((0..1000).all(|_| off.admit(ip(1), t0)));
    }

    #[test]
    fn source_table_stays_bounded() {
        let t0 = Instant::now();
        let mut r = SourceRate::new(1);
        for n in 0..(MAX_TRACKED_SOURCES as u32 + 1000) {
            assert!(r.admit(ip(n), t0));
        }
        assert_eq!(r.tracked(), MAX_TRACKED_SOURCES);
        assert!(!r.admit(ip(5), t0), "tracked addresses are still limited");
        assert!(r.admit(ip(1), t0 + RATE_WINDOW));
        assert_eq!(r.tracked(), 1, "the next window starts empty");
    }
}
