//! QUIC transport signals (loss, retransmission, congestion window,
//! handshake time, closes by reason), kept per worker as relaxed atomics
//! and summed on scrape by [`SignalsCollector`].
//!
//! Recorded once per connection (handshake, close), never per packet:
//! quiche keeps the per-packet counts itself and [`ObsMetrics::conn_closed`]
//! adds its totals when the connection ends.

use std::fmt;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::DescriptorEncoder;

use super::metrics::{counter, histogram, labelled_counter, sum_histogram, sum_u64, WorkerList};
use super::probes::{self, CloseReason};
use super::{AtomicHistogram, Buckets, WorkerMetrics};

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
}

impl ObsMetrics {
    /// A handshake completed `took` after the connection was accepted.
    pub fn handshake_done(&self, conn: u64, took: Duration) {
        self.handshake_duration.observe(took.as_secs_f64());
        probes::handshake_done(conn, took);
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
        Ok(())
    }
}
