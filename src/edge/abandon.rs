//! Abandoned streams per source address.
//!
//! A stream that ends by reset (or with its request unread) costs a little
//! HTTP/3 state that quiche keeps until the connection closes, and each one
//! is a request spooky parsed for nothing: the "rapid reset" attack
//! (CVE-2023-44487) opens and resets streams as fast as it may. One
//! connection is closed after `limits.max_abandoned_streams_per_connection`;
//! a client that simply reconnects would start again from zero, so
//! abandoned streams are also counted per source IP over a fixed window
//! (`limits.max_abandoned_streams_per_source`). A source past its limit has
//! each connection closed with H3_EXCESSIVE_LOAD at its next abandoned
//! stream, and its new connections refused (their Initials dropped, before
//! any handshake work) until the window ends: reconnecting buys nothing.
//!
//! The table is bounded: at most `capacity` sources are tracked; when it is
//! full, expired windows are swept (at most once per window, so a flood of
//! new addresses cannot make every insert a full scan) and a source that
//! still finds no room is not tracked (the per-connection limit still holds).

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// Window over which a source's abandoned streams are counted.
pub const ABANDON_WINDOW: Duration = Duration::from_secs(10);

/// Source addresses tracked per worker (about 40 bytes each).
pub const ABANDON_TABLE_CAPACITY: usize = 4096;

#[derive(Debug, Clone, Copy)]
struct Window {
    started: Instant,
    count: u32,
}

/// Abandoned-stream counts per source IP; see the module docs.
#[derive(Debug)]
pub struct AbandonLedger {
    window: Duration,
    limit: u32,
    capacity: usize,
    by_source: HashMap<IpAddr, Window>,
    last_sweep: Option<Instant>,
}

impl AbandonLedger {
    pub fn new(window: Duration, limit: u32, capacity: usize) -> Self {
        Self {
            window,
            limit,
            capacity,
            by_source: HashMap::new(),
            last_sweep: None,
        }
    }

    /// Counts one abandoned stream from `source`; true when the source is
    /// past its limit for the current window.
    pub fn record(&mut self, source: IpAddr, now: Instant) -> bool {
        let source = canonical(source);
        if !self.by_source.contains_key(&source) && !self.make_room(now) {
            return false;
        }
        let w = self.by_source.entry(source).or_insert(Window {
            started: now,
            count: 0,
        });
        if now.saturating_duration_since(w.started) >= self.window {
            *w = Window {
                started: now,
                count: 0,
            };
        }
        w.count = w.count.saturating_add(1);
        w.count > self.limit
    }

    /// Applies a reloaded `limits.max_abandoned_streams_per_source`; counts
    /// already made stay.
    pub fn set_limit(&mut self, limit: u32) {
        self.limit = limit;
    }

    /// Whether `source` is past its limit in a window that is still open,
    /// without counting anything: new connections from it are refused
    /// until the window ends, so reconnecting buys an attacker nothing.
    pub fn is_over(&self, source: IpAddr, now: Instant) -> bool {
        self.by_source.get(&canonical(source)).is_some_and(|w| {
            w.count > self.limit && now.saturating_duration_since(w.started) < self.window
        })
    }

    /// Sources currently tracked.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.by_source.len()
    }

    /// Whether a new source fits, sweeping expired windows if the table is
    /// full and no sweep ran during the last window.
    fn make_room(&mut self, now: Instant) -> bool {
        if self.by_source.len() < self.capacity {
            return true;
        }
        let swept_recently = self
            .last_sweep
            .is_some_and(|t| now.saturating_duration_since(t) < self.window);
        if swept_recently {
            return false;
        }
        self.last_sweep = Some(now);
        let window = self.window;
        self.by_source
            .retain(|_, w| now.saturating_duration_since(w.started) < window);
        self.by_source.len() < self.capacity
    }
}

/// An IPv4 client seen through a dual-stack socket is the same source.
fn canonical(ip: IpAddr) -> IpAddr {
    ip.to_canonical()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([192, 0, 2, last])
    }

    #[test]
    fn a_source_past_its_limit_is_flagged_across_connections() {
        let mut l = AbandonLedger::new(Duration::from_secs(10), 3, 16);
        let t = Instant::now();
        // Counts are per address, whatever connection the streams were on.
        assert!(!l.record(ip(1), t));
        assert!(!l.record(ip(1), t));
        assert!(!l.record(ip(1), t));
        assert!(l.record(ip(1), t));
        assert!(!l.record(ip(2), t), "another source is unaffected");
    }

    #[test]
    fn a_source_stays_over_until_its_window_ends() {
        let mut l = AbandonLedger::new(Duration::from_secs(10), 1, 16);
        let t = Instant::now();
        assert!(!l.is_over(ip(1), t), "an unknown source is not over");
        l.record(ip(1), t);
        assert!(!l.is_over(ip(1), t), "at the limit is not past it");
        l.record(ip(1), t);
        assert!(l.is_over(ip(1), t + Duration::from_secs(9)));
        assert!(!l.is_over(ip(1), t + Duration::from_secs(10)));
        assert!(!l.is_over(ip(2), t), "another source is unaffected");
        let mapped = IpAddr::from(std::net::Ipv4Addr::new(192, 0, 2, 1).to_ipv6_mapped());
        assert!(l.is_over(mapped, t), "v4-mapped is the same source");
    }

    #[test]
    fn the_window_resets_the_count() {
        let mut l = AbandonLedger::new(Duration::from_secs(10), 1, 16);
        let t = Instant::now();
        assert!(!l.record(ip(1), t));
        assert!(l.record(ip(1), t + Duration::from_secs(9)));
        assert!(!l.record(ip(1), t + Duration::from_secs(10)));
    }

    #[test]
    fn mapped_ipv4_counts_as_the_same_source() {
        let mut l = AbandonLedger::new(Duration::from_secs(10), 1, 16);
        let t = Instant::now();
        let mapped: IpAddr = "::ffff:192.0.2.1".parse().unwrap_or(ip(0));
        assert!(!l.record(ip(1), t));
        assert!(l.record(mapped, t));
    }

    #[test]
    fn the_table_stays_bounded_and_reclaims_expired_sources() {
        let mut l = AbandonLedger::new(Duration::from_secs(10), 1, 4);
        let t = Instant::now();
        for i in 0..4 {
            l.record(ip(i), t);
        }
        // Full and nothing expired: a new source is not tracked.
        assert!(!l.record(ip(9), t));
        assert!(!l.record(ip(9), t));
        assert_eq!(l.len(), 4);
        // One window later the expired sources make room.
        let later = t + Duration::from_secs(11);
        assert!(!l.record(ip(9), later));
        assert!(l.record(ip(9), later));
        assert_eq!(l.len(), 1);
    }
}
