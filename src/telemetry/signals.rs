//! QUIC transport signals (loss, retransmission, congestion window,
//! handshake time, closes by reason), kept per worker as relaxed atomics
//! and summed on scrape by [`SignalsCollector`].
//!
//! Recorded once per connection (handshake, close), never per packet:
//! quiche keeps the per-packet counts itself and [`ObsMetrics::conn_closed`]
//! adds its totals when the connection ends. While connections are open,
//! each worker samples their congestion window and RTT once a second
//! ([`ObsMetrics::path_sampled`], from `Edge::sample_paths`), so a
//! long-lived connection shows up before it closes. quiche 0.30's
//! `PathStats` has no bytes-in-flight figure (only `Stats::
//! bytes_in_flight_duration`), so none is sampled.

use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::DescriptorEncoder;

use super::metrics::{counter, histogram, labelled_counter, sum_histogram, sum_u64, WorkerList};
use super::probes::{self, CloseReason};
use super::{AtomicHistogram, Buckets, WorkerMetrics};
use crate::config::Policy;

/// Handshake duration in seconds: loopback (~1 ms) .. a slow mobile path.
#[derive(Debug)]
pub struct HandshakeBuckets;
impl Buckets for HandshakeBuckets {
    const BOUNDS: &'static [f64] = &[
        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
    ];
    const SUM_SCALE: f64 = 1e6;
}

/// Congestion window in bytes: from the 2-packet floor to 64 MiB.
#[derive(Debug)]
pub struct CwndBuckets;
impl Buckets for CwndBuckets {
    const BOUNDS: &'static [f64] = &[
        4096.0, 16384.0, 65536.0, 262144.0, 1048576.0, 4194304.0, 16777216.0, 67108864.0,
    ];
    const SUM_SCALE: f64 = 1.0;
}

/// One worker's QUIC transport signals.
#[derive(Debug, Default)]
pub struct ObsMetrics {
    /// Connections closed, by [`CloseReason`] (index into `CloseReason::ALL`).
    pub closed_by_reason: [AtomicU64; CloseReason::ALL.len()],
    /// Packets quiche declared lost, summed over closed connections.
    pub packets_lost: AtomicU64,
    /// Packets quiche retransmitted.
    pub packets_retransmitted: AtomicU64,
    /// Packets sent (the denominator of a loss ratio).
    pub packets_sent: AtomicU64,
    /// Payload bytes declared lost.
    pub bytes_lost: AtomicU64,
    /// Time from the first Initial to an established connection.
    pub handshake_duration: AtomicHistogram<HandshakeBuckets>,
    /// Congestion window of each connection's active path when it closes.
    pub cwnd: AtomicHistogram<CwndBuckets>,
    /// Congestion window of open connections' active paths, sampled.
    pub cwnd_sampled: AtomicHistogram<CwndBuckets>,
    /// Bytes in flight on open connections' active paths, sampled (same
    /// buckets as the window, so the two read side by side).
    pub in_flight_sampled: AtomicHistogram<CwndBuckets>,
    /// Smoothed RTT of open connections' active paths, sampled.
    pub rtt_sampled: AtomicHistogram<super::RttBuckets>,
    /// Per-backend picks, outcomes, latency, retries, ejections.
    pub backends: BackendTable,
}

impl ObsMetrics {
    /// A handshake completed `took` after the connection was accepted.
    pub fn handshake_done(&self, conn: u64, took: Duration) {
        self.handshake_duration.observe(took.as_secs_f64());
        probes::handshake_done(conn, took);
    }

    /// One periodic sample of an open connection's active path.
    pub fn path_sampled(&self, cwnd: usize, in_flight: usize, rtt: Duration) {
        self.cwnd_sampled.observe(cwnd as f64);
        self.in_flight_sampled.observe(in_flight as f64);
        self.rtt_sampled.observe(rtt.as_secs_f64());
    }

    /// The balancer picked `backend` for a request: `request_routed` and
    /// the per-backend pick count.
    pub fn routed(&self, request_id: u64, upstream: &str, backend: SocketAddr, policy: Policy) {
        probes::request_routed(request_id, upstream, &backend);
        self.backends.picked(upstream, backend, policy);
    }

    /// An attempt on `backend` failed and the request goes elsewhere.
    pub fn retried(
        &self,
        request_id: u64,
        upstream: &str,
        backend: SocketAddr,
        policy: Policy,
        attempt: usize,
    ) {
        probes::retry(request_id, upstream, &backend, attempt);
        self.backends.retried(upstream, backend, policy);
    }

    /// Outlier detection ejected `backend` for `ejected_for`.
    pub fn ejected(
        &self,
        upstream: &str,
        backend: SocketAddr,
        policy: Policy,
        ejected_for: Duration,
    ) {
        probes::backend_state(
            upstream,
            &backend,
            probes::BackendEvent::Ejected,
            ejected_for,
        );
        self.backends.ejected(upstream, backend, policy);
    }

    /// Adds a closed connection's transport totals and fires `conn_close`.
    pub fn conn_closed(&self, conn: u64, quic: &quiche::Connection, established: bool) {
        let reason = CloseReason::of(quic, established);
        let idx = CloseReason::ALL
            .iter()
            .position(|r| *r == reason)
            .unwrap_or(0);
        if let Some(c) = self.closed_by_reason.get(idx) {
            WorkerMetrics::inc(c);
        }
        let s = quic.stats();
        WorkerMetrics::add(&self.packets_lost, s.lost as u64);
        WorkerMetrics::add(&self.packets_retransmitted, s.retrans as u64);
        WorkerMetrics::add(&self.packets_sent, s.sent as u64);
        WorkerMetrics::add(&self.bytes_lost, s.lost_bytes);
        let path = quic.path_stats().find(|p| p.active);
        if let Some(p) = &path {
            self.cwnd.observe(p.cwnd as f64);
        }
        let rtt = path.map(|p| p.rtt).unwrap_or_default();
        probes::conn_close(conn, reason, s.lost, s.sent, rtt);
    }
}

/// Encodes the summed [`ObsMetrics`] of every worker.
#[derive(Debug)]
pub(super) struct SignalsCollector(pub(super) Arc<WorkerList>);

impl Collector for SignalsCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> fmt::Result {
        let ws = self.0.lock();
        let ws = ws.as_slice();
        let e = &mut enc;
        let mut closed = [("", 0u64); CloseReason::ALL.len()];
        for (i, (slot, r)) in closed.iter_mut().zip(CloseReason::ALL).enumerate() {
            *slot = (r.as_str(), sum_u64(ws, |w| &w.obs.closed_by_reason[i]));
        }
        labelled_counter(
            e,
            "quic_connections_closed_by_reason",
            "QUIC connections closed, by reason (handshake_failed, idle_timeout, peer_closed, peer_error, local_closed, local_error).",
            "reason",
            &closed,
        )?;
        counter(
            e,
            "quic_packets_lost",
            "QUIC packets declared lost, added when each connection closes.",
            sum_u64(ws, |w| &w.obs.packets_lost),
        )?;
        counter(
            e,
            "quic_packets_retransmitted",
            "QUIC packets retransmitted, added when each connection closes.",
            sum_u64(ws, |w| &w.obs.packets_retransmitted),
        )?;
        counter(
            e,
            "quic_packets_sent",
            "QUIC packets sent, added when each connection closes.",
            sum_u64(ws, |w| &w.obs.packets_sent),
        )?;
        counter(
            e,
            "quic_lost_bytes",
            "QUIC payload bytes declared lost, added when each connection closes.",
            sum_u64(ws, |w| &w.obs.bytes_lost),
        )?;
        histogram(
            e,
            "quic_handshake_duration_seconds",
            "Time from a connection's first Initial to the completed handshake.",
            &sum_histogram(ws, |w| &w.obs.handshake_duration),
        )?;
        histogram(
            e,
            "quic_congestion_window_bytes",
            "Congestion window of each connection's active path, sampled when it closes.",
            &sum_histogram(ws, |w| &w.obs.cwnd),
        )?;
        histogram(
            e,
            "quic_sampled_congestion_window_bytes",
            "Congestion window of open connections' active paths, sampled once a second per worker (at most 1000 connections a tick, round-robin).",
            &sum_histogram(ws, |w| &w.obs.cwnd_sampled),
        )?;
        histogram(
            e,
            "quic_sampled_in_flight_bytes",
            "Bytes in flight (sent, not yet acknowledged or lost) on open connections' active paths, sampled once a second per worker (at most 1000 connections a tick, round-robin).",
            &sum_histogram(ws, |w| &w.obs.in_flight_sampled),
        )?;
        histogram(
            e,
            "quic_sampled_rtt_seconds",
            "Smoothed RTT of open connections' active paths, sampled once a second per worker (at most 1000 connections a tick, round-robin).",
            &sum_histogram(ws, |w| &w.obs.rtt_sampled),
        )?;
        Ok(())
    }
}

/// Status classes of `spooky_upstream_backend_responses_total`: a response
/// status's hundreds, or `error` (no response: connect failure, reset,
/// timeout).
const BACKEND_CLASSES: [&str; 6] = ["error", "1xx", "2xx", "3xx", "4xx", "5xx"];

/// Counters of one backend of one upstream, as one worker saw them.
#[derive(Debug, Clone, Default)]
pub struct BackendCounters {
    /// The upstream's policy (`round_robin`, …), the `policy` label.
    pub policy: String,
    pub picks: u64,
    /// Attempt outcomes by [`BACKEND_CLASSES`] index.
    pub responses: [u64; BACKEND_CLASSES.len()],
    pub retries: u64,
    pub ejections: u64,
    /// Attempt duration (request sent .. response ended or failed).
    pub latency: super::HistogramSum,
}

/// One worker's per-backend counters: upstream name → backend → counters.
///
/// Keys come only from the config in effect (a request is only ever routed
/// to a configured backend, and [`BackendTable::retain`] drops backends a
/// reload removed), so label cardinality is bounded by config, not traffic.
/// The lock is the worker's own and taken once per attempt event; the
/// admin thread takes it only to copy the table on scrape.
#[derive(Debug, Default)]
pub struct BackendTable(
    std::sync::Mutex<
        std::collections::BTreeMap<
            String,
            std::collections::BTreeMap<std::net::SocketAddr, BackendCounters>,
        >,
    >,
);

/// Latency buckets of backend attempts: the request-duration layout.
type BackendLatency = super::DurationBuckets;

impl BackendTable {
    fn with(
        &self,
        upstream: &str,
        backend: std::net::SocketAddr,
        policy: crate::config::Policy,
        f: impl FnOnce(&mut BackendCounters),
    ) {
        // A panic while held cannot leave a counter half-written.
        let mut t = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if !t.contains_key(upstream) {
            t.insert(upstream.to_string(), Default::default());
        }
        let Some(by_addr) = t.get_mut(upstream) else {
            return;
        };
        let c = by_addr.entry(backend).or_insert_with(|| BackendCounters {
            policy: policy_name(policy),
            latency: AtomicHistogram::<BackendLatency>::empty_sum(),
            ..Default::default()
        });
        f(c);
    }

    /// The balancer picked `backend` of `upstream`.
    pub fn picked(
        &self,
        upstream: &str,
        backend: std::net::SocketAddr,
        policy: crate::config::Policy,
    ) {
        self.with(upstream, backend, policy, |c| c.picks += 1);
    }

    /// An attempt on `backend` ended with `status` (None: no response).
    pub fn attempt_done(
        &self,
        upstream: &str,
        backend: std::net::SocketAddr,
        policy: crate::config::Policy,
        status: Option<u16>,
        took: Duration,
    ) {
        let idx = match status {
            Some(s @ 100..=599) => usize::from(s / 100),
            _ => 0,
        };
        self.with(upstream, backend, policy, |c| {
            if let Some(n) = c.responses.get_mut(idx) {
                *n += 1;
            }
            observe_into::<BackendLatency>(&mut c.latency, took.as_secs_f64());
        });
    }

    /// The attempt on `backend` failed and the request was retried.
    pub fn retried(
        &self,
        upstream: &str,
        backend: std::net::SocketAddr,
        policy: crate::config::Policy,
    ) {
        self.with(upstream, backend, policy, |c| c.retries += 1);
    }

    /// Outlier detection ejected `backend`.
    pub fn ejected(
        &self,
        upstream: &str,
        backend: std::net::SocketAddr,
        policy: crate::config::Policy,
    ) {
        self.with(upstream, backend, policy, |c| c.ejections += 1);
    }

    /// Forgets backends no longer configured (after a reload).
    pub fn retain(&self, keep: impl Fn(&str, &std::net::SocketAddr) -> bool) {
        let mut t = self.0.lock().unwrap_or_else(|e| e.into_inner());
        for (u, by_addr) in t.iter_mut() {
            by_addr.retain(|a, _| keep(u, a));
        }
        t.retain(|_, by_addr| !by_addr.is_empty());
    }

    fn snapshot(&self) -> Vec<((String, std::net::SocketAddr), BackendCounters)> {
        let t = self.0.lock().unwrap_or_else(|e| e.into_inner());
        t.iter()
            .flat_map(|(u, m)| m.iter().map(move |(a, c)| ((u.clone(), *a), c.clone())))
            .collect()
    }
}

/// A policy's config spelling (`round_robin`, …) for the `policy` label.
fn policy_name(p: crate::config::Policy) -> String {
    serde_json::to_value(p)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_else(|| "unknown".into())
}

/// Adds one observation to a summed histogram of layout `B`.
fn observe_into<B: Buckets>(h: &mut super::HistogramSum, v: f64) {
    let v = if v.is_finite() { v.max(0.0) } else { 0.0 };
    let idx = B::BOUNDS
        .iter()
        .position(|b| v <= *b)
        .unwrap_or(B::BOUNDS.len());
    if let Some(slot) = h.buckets.get_mut(idx) {
        slot.1 += 1;
    }
    h.count += 1;
    h.raw_sum = h.raw_sum.saturating_add((v * B::SUM_SCALE).round() as u64);
}

/// Adds `from` into `into` (same layout).
fn merge_counters(into: &mut BackendCounters, from: &BackendCounters) {
    into.picks += from.picks;
    into.retries += from.retries;
    into.ejections += from.ejections;
    for (a, b) in into.responses.iter_mut().zip(from.responses) {
        *a += b;
    }
    into.latency.count += from.latency.count;
    into.latency.raw_sum = into.latency.raw_sum.saturating_add(from.latency.raw_sum);
    for (a, b) in into.latency.buckets.iter_mut().zip(&from.latency.buckets) {
        a.1 += b.1;
    }
}

/// Sums every worker's [`BackendTable`] per (upstream, backend).
fn summed_backends(
    ws: &[Arc<WorkerMetrics>],
) -> std::collections::BTreeMap<(String, std::net::SocketAddr), BackendCounters> {
    let mut acc: std::collections::BTreeMap<(String, std::net::SocketAddr), BackendCounters> =
        Default::default();
    for w in ws {
        for (k, c) in w.obs.backends.snapshot() {
            match acc.get_mut(&k) {
                Some(a) => merge_counters(a, &c),
                None => {
                    acc.insert(k, c);
                }
            }
        }
    }
    acc
}

/// `spooky_upstream_backend_*` families: one series per configured backend.
#[derive(Debug)]
pub(super) struct BackendCollector(pub(super) Arc<WorkerList>);

impl Collector for BackendCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> fmt::Result {
        use prometheus_client::encoding::EncodeMetric;
        use prometheus_client::metrics::counter::ConstCounter;
        use prometheus_client::metrics::MetricType;
        let sums = {
            let ws = self.0.lock();
            summed_backends(ws.as_slice())
        };
        let e = &mut enc;
        let mut m = e.encode_descriptor(
            "balancer_backend_picks",
            "Backend selections, by upstream, backend and the upstream's policy.",
            None,
            MetricType::Counter,
        )?;
        for ((u, a), c) in &sums {
            let addr = a.to_string();
            let labels = [
                ("upstream", u.as_str()),
                ("backend", addr.as_str()),
                ("policy", c.policy.as_str()),
            ];
            ConstCounter::new(c.picks).encode(m.encode_family(&labels)?)?;
        }
        let mut m = e.encode_descriptor(
            "upstream_backend_responses",
            "Attempts on each backend, by response status class (error: no response).",
            None,
            MetricType::Counter,
        )?;
        for ((u, a), c) in &sums {
            let addr = a.to_string();
            for (class, n) in BACKEND_CLASSES.iter().zip(c.responses) {
                let labels = [
                    ("upstream", u.as_str()),
                    ("backend", addr.as_str()),
                    ("class", *class),
                ];
                ConstCounter::new(n).encode(m.encode_family(&labels)?)?;
            }
        }
        for (name, help, get) in [
            (
                "upstream_backend_retries",
                "Requests retried elsewhere after an attempt on this backend failed.",
                (|c: &BackendCounters| c.retries) as fn(&BackendCounters) -> u64,
            ),
            (
                "upstream_backend_ejections",
                "Outlier-detection ejections of this backend.",
                |c: &BackendCounters| c.ejections,
            ),
        ] {
            let mut m = e.encode_descriptor(name, help, None, MetricType::Counter)?;
            for ((u, a), c) in &sums {
                let addr = a.to_string();
                let labels = [("upstream", u.as_str()), ("backend", addr.as_str())];
                ConstCounter::new(get(c)).encode(m.encode_family(&labels)?)?;
            }
        }
        let mut m = e.encode_descriptor(
            "upstream_backend_duration_seconds",
            "Attempt duration on each backend: request sent until the response ended or failed.",
            None,
            MetricType::Histogram,
        )?;
        for ((u, a), c) in &sums {
            let addr = a.to_string();
            let labels = [("upstream", u.as_str()), ("backend", addr.as_str())];
            m.encode_family(&labels)?
                .encode_histogram::<Vec<(String, String)>>(
                    c.latency.sum(),
                    c.latency.count,
                    &c.latency.buckets,
                    None,
                )?;
        }
        Ok(())
    }
}
