//! OpenMetrics exposition of the per-worker counters.
//!
//! Workers only ever do relaxed atomic adds on their own [`WorkerMetrics`];
//! nothing on the hot path takes a lock. On scrape, [`WorkerSum`] walks the
//! list of workers and sums each counter into a const metric, so the text is
//! produced by `prometheus-client` without keeping a second copy of any value.

use std::fmt;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use super::RetryReason;
use super::{
    AtomicHistogram, Buckets, DropReason, HistogramSum, PathEvent, ReloadStats, WorkerMetrics,
};

/// Prefix of every family name.
const PREFIX: &str = "spooky";

/// `class` label values of `spooky_requests_total`, by index into
/// [`WorkerMetrics::requests`].
const REQUEST_CLASSES: [&str; 6] = ["aborted", "1xx", "2xx", "3xx", "4xx", "5xx"];

/// The workers' counter blocks. Locked only when a worker is added (start-up)
/// and when scraped.
#[derive(Debug, Default)]
pub(super) struct WorkerList(Mutex<Vec<Arc<WorkerMetrics>>>);

impl WorkerList {
    pub(super) fn lock(&self) -> MutexGuard<'_, Vec<Arc<WorkerMetrics>>> {
        // The list is only pushed to, so a panic while it was held cannot
        // have left it half-updated.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Every metric of the process, rendered as OpenMetrics text on scrape.
///
/// Per-backend families will be added here as further collectors.
#[derive(Debug)]
pub struct MetricsRegistry {
    workers: Arc<WorkerList>,
    reload: Arc<ReloadStats>,
    registry: Registry,
    /// The per-backend board `spooky_upstream_backend_up` reads, once the
    /// control plane has attached it.
    board: Arc<std::sync::OnceLock<Arc<super::backends::BackendBoard>>>,
    /// The access log's drop counters, once `main` has started it.
    access_log: Arc<std::sync::OnceLock<Arc<super::access::AccessLogStats>>>,
}

impl MetricsRegistry {
    pub fn new() -> Arc<Self> {
        let workers = Arc::new(WorkerList::default());
        let mut registry = Registry::with_prefix(PREFIX);
        registry.register_collector(Box::new(WorkerSum(Arc::clone(&workers))));
        registry.register_collector(Box::new(BuildInfo));
        registry.register_collector(Box::new(super::signals::SignalsCollector(Arc::clone(
            &workers,
        ))));
        registry.register_collector(Box::new(super::signals::BackendCollector(Arc::clone(
            &workers,
        ))));
        let reload = Arc::new(ReloadStats::default());
        registry.register_collector(Box::new(ReloadCollector(Arc::clone(&reload))));
        let board = Arc::new(std::sync::OnceLock::new());
        registry.register_collector(Box::new(BoardCollector(Arc::clone(&board))));
        let access_log = Arc::new(std::sync::OnceLock::new());
        registry.register_collector(Box::new(AccessLogCollector(Arc::clone(&access_log))));
        Arc::new(Self {
            workers,
            reload,
            registry,
            board,
            access_log,
        })
    }

    /// Serves `spooky_access_log_dropped_total` from `stats` (the first
    /// attached stays; there is one access log per process).
    pub fn attach_access_log(&self, stats: Arc<super::access::AccessLogStats>) {
        let _ = self.access_log.set(stats);
    }

    /// Serves `spooky_upstream_backend_up` from `board` (the first board
    /// attached stays; there is one per process).
    pub fn attach_board(&self, board: Arc<super::backends::BackendBoard>) {
        let _ = self.board.set(board);
    }

    /// The config reload counters, for the control plane to bump.
    pub fn reload_stats(&self) -> Arc<ReloadStats> {
        Arc::clone(&self.reload)
    }

    /// Registers and returns a new per-worker counter block.
    pub fn add_worker(&self) -> Arc<WorkerMetrics> {
        let m = Arc::new(WorkerMetrics::default());
        self.workers.lock().push(Arc::clone(&m));
        m
    }

    /// The exposition in `format` (see [`super::exposition`]).
    pub fn render_as(&self, format: super::exposition::Format) -> String {
        match format {
            super::exposition::Format::OpenMetrics => self.render(),
            super::exposition::Format::PrometheusText => {
                super::exposition::to_prometheus_text(&self.render())
            }
        }
    }

    /// The whole OpenMetrics exposition, `# EOF` included.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(8 * 1024);
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            // Writing to a String cannot fail; only a collector could.
            tracing::error!("metrics: encoding failed: {e}");
        }
        out
    }
}

/// Sums the atomics of all workers at encode time.
#[derive(Debug)]
struct WorkerSum(Arc<WorkerList>);

pub(super) fn sum_u64(ws: &[Arc<WorkerMetrics>], f: impl Fn(&WorkerMetrics) -> &AtomicU64) -> u64 {
    ws.iter().fold(0u64, |acc, w| {
        acc.wrapping_add(f(w).load(Ordering::Relaxed))
    })
}

fn sum_i64(ws: &[Arc<WorkerMetrics>], f: impl Fn(&WorkerMetrics) -> &AtomicI64) -> i64 {
    ws.iter().fold(0i64, |acc, w| {
        acc.wrapping_add(f(w).load(Ordering::Relaxed))
    })
}

pub(super) fn counter(enc: &mut DescriptorEncoder, name: &str, help: &str, v: u64) -> fmt::Result {
    let m = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
    ConstCounter::new(v).encode(m)
}

fn gauge(enc: &mut DescriptorEncoder, name: &str, help: &str, v: i64) -> fmt::Result {
    let m = enc.encode_descriptor(name, help, None, MetricType::Gauge)?;
    ConstGauge::new(v).encode(m)
}

/// One counter family with one label, one series per `(label value, count)`.
pub(super) fn labelled_counter(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    key: &str,
    series: &[(&str, u64)],
) -> fmt::Result {
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
    for &(value, v) in series {
        let labels = [(key, value)];
        ConstCounter::new(v).encode(m.encode_family(&labels)?)?;
    }
    Ok(())
}

pub(super) fn sum_histogram<B: Buckets>(
    ws: &[Arc<WorkerMetrics>],
    f: impl Fn(&WorkerMetrics) -> &AtomicHistogram<B>,
) -> HistogramSum {
    let mut acc = AtomicHistogram::<B>::empty_sum();
    for w in ws {
        f(w).add_to(&mut acc);
    }
    acc
}

pub(super) fn histogram(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    h: &HistogramSum,
) -> fmt::Result {
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Histogram)?;
    m.encode_histogram::<NoLabels>(h.sum(), h.count, &h.buckets, None)
}

/// Label set type for histograms without exemplars.
type NoLabels = Vec<(String, String)>;

impl Collector for WorkerSum {
    fn encode(&self, mut enc: DescriptorEncoder) -> fmt::Result {
        let ws = self.0.lock();
        let ws = ws.as_slice();
        let e = &mut enc;
        encode_quic(e, ws)?;
        encode_io(e, ws)?;
        encode_requests(e, ws)?;
        encode_upstream(e, ws)?;
        encode_paths_and_histograms(e, ws)
    }
}

/// QUIC connections, handshakes, Retry and dropped datagrams.
fn encode_quic(e: &mut DescriptorEncoder, ws: &[Arc<WorkerMetrics>]) -> fmt::Result {
    gauge(
        e,
        "quic_connections_active",
        "QUIC connections currently open.",
        sum_i64(ws, |w| &w.conns_active),
    )?;
    counter(
        e,
        "quic_connections_opened",
        "QUIC connections accepted.",
        sum_u64(ws, |w| &w.conns_opened),
    )?;
    counter(
        e,
        "quic_connections_closed",
        "QUIC connections closed.",
        sum_u64(ws, |w| &w.conns_closed),
    )?;
    counter(
        e,
        "quic_handshakes",
        "QUIC handshakes completed.",
        sum_u64(ws, |w| &w.handshakes),
    )?;
    counter(
        e,
        "quic_handshake_failures",
        "QUIC handshakes that failed or timed out.",
        sum_u64(ws, |w| &w.handshake_failures),
    )?;
    let mut retries = [("", 0u64); RetryReason::ALL.len()];
    for (i, (slot, r)) in retries.iter_mut().zip(RetryReason::ALL).enumerate() {
        *slot = (r.as_str(), sum_u64(ws, |w| &w.retries_by_reason[i]));
    }
    labelled_counter(
        e,
        "quic_retries_sent",
        "QUIC Retry packets sent, by reason (always: quic.retry true; half_open: retry_threshold reached).",
        "reason",
        &retries,
    )?;
    gauge(
        e,
        "quic_half_open_connections",
        "QUIC connections whose handshake has not completed.",
        sum_i64(ws, |w| &w.half_open),
    )?;
    counter(
        e,
        "quic_handshake_timeouts",
        "QUIC connections discarded because the handshake did not complete within quic.handshake_timeout_ms.",
        sum_u64(ws, |w| &w.handshake_timeouts),
    )?;
    counter(
        e,
        "quic_icmp_unreachable",
        "ICMP port/host/network unreachable reports about datagrams sent to a connection's client (matched by address and connection id).",
        sum_u64(ws, |w| &w.icmp_unreachable_matched),
    )?;
    counter(
        e,
        "quic_unreachable_closes",
        "QUIC connections discarded because their client stayed silent for 1 s after an ICMP unreachable; their requests' backend streams are reset.",
        sum_u64(ws, |w| &w.unreachable_closes),
    )?;
    counter(
        e,
        "quic_version_negotiations",
        "QUIC Version Negotiation packets sent.",
        sum_u64(ws, |w| &w.version_negotiations),
    )?;
    let mut dropped = [("", 0u64); DropReason::ALL.len()];
    for (i, (slot, r)) in dropped.iter_mut().zip(DropReason::ALL).enumerate() {
        *slot = (r.as_str(), sum_u64(ws, |w| &w.dropped[i]));
    }
    labelled_counter(
        e,
        "quic_datagrams_dropped",
        "Datagrams dropped before reaching a connection, by reason.",
        "reason",
        &dropped,
    )?;
    Ok(())
}

/// Datagram I/O: datagrams, bytes, syscalls, GSO and the io_uring.
fn encode_io(e: &mut DescriptorEncoder, ws: &[Arc<WorkerMetrics>]) -> fmt::Result {
    labelled_counter(
        e,
        "io_datagrams",
        "UDP datagrams received and sent.",
        "direction",
        &[
            ("in", sum_u64(ws, |w| &w.datagrams_in)),
            ("out", sum_u64(ws, |w| &w.datagrams_out)),
        ],
    )?;
    labelled_counter(
        e,
        "io_bytes",
        "UDP payload bytes received and sent.",
        "direction",
        &[
            ("in", sum_u64(ws, |w| &w.bytes_in)),
            ("out", sum_u64(ws, |w| &w.bytes_out)),
        ],
    )?;
    labelled_counter(
        e,
        "io_syscalls",
        "UDP receive and send system calls.",
        "direction",
        &[
            ("in", sum_u64(ws, |w| &w.recv_syscalls)),
            ("out", sum_u64(ws, |w| &w.send_syscalls)),
        ],
    )?;
    counter(
        e,
        "io_gso_fallbacks",
        "Sends that fell back from GSO to one datagram per call.",
        sum_u64(ws, |w| &w.gso_fallbacks),
    )?;
    counter(
        e,
        "io_send_errors",
        "UDP sends that failed.",
        sum_u64(ws, |w| &w.send_errors),
    )?;
    counter(
        e,
        "io_ring_submissions",
        "io_uring_enter calls that submitted work (io_uring driver only).",
        sum_u64(ws, |w| &w.ring_submits),
    )?;
    counter(
        e,
        "io_ring_completions",
        "io_uring completions reaped (io_uring driver only).",
        sum_u64(ws, |w| &w.ring_completions),
    )?;
    counter(
        e,
        "io_recv_buffers_exhausted",
        "Times the io_uring provided receive buffers ran out; the kernel drops datagrams until they return.",
        sum_u64(ws, |w| &w.recv_buffers_exhausted),
    )?;
    counter(
        e,
        "io_recv_truncated",
        "Receives cut short (MSG_TRUNC); non-zero means datagrams were damaged.",
        sum_u64(ws, |w| &w.recv_truncated),
    )?;
    Ok(())
}

/// Requests by class, in flight, malformed and cancelled.
fn encode_requests(e: &mut DescriptorEncoder, ws: &[Arc<WorkerMetrics>]) -> fmt::Result {
    let mut requests = [("", 0u64); REQUEST_CLASSES.len()];
    for (i, (slot, class)) in requests.iter_mut().zip(REQUEST_CLASSES).enumerate() {
        *slot = (class, sum_u64(ws, |w| &w.requests[i]));
    }
    labelled_counter(
        e,
        "requests",
        "HTTP/3 requests finished, by status class (aborted: no status sent).",
        "class",
        &requests,
    )?;
    gauge(
        e,
        "requests_in_flight",
        "HTTP/3 requests currently being handled.",
        sum_i64(ws, |w| &w.requests_in_flight),
    )?;
    let malformed = crate::router::MalformedReason::ALL.map(|r| {
        (
            r.as_str(),
            sum_u64(ws, |w| &w.malformed_requests[r.index()]),
        )
    });
    labelled_counter(
        e,
        "requests_malformed",
        "HTTP/3 requests reset with H3_MESSAGE_ERROR as malformed, by the rule broken.",
        "reason",
        &malformed,
    )?;
    counter(
        e,
        "requests_client_cancelled",
        "HTTP/3 requests cancelled by the client.",
        sum_u64(ws, |w| &w.client_cancels),
    )?;
    counter(
        e,
        "requests_cancelled_before_dispatch",
        "HTTP/3 requests reset by the client before reaching a backend.",
        sum_u64(ws, |w| &w.cancelled_before_dispatch),
    )?;
    counter(
        e,
        "quic_abandoned_stream_closes",
        "Connections closed with H3_EXCESSIVE_LOAD for abandoning too many streams.",
        sum_u64(ws, |w| &w.abandoned_stream_closes),
    )?;
    Ok(())
}

/// Backends: connects, resets, timeouts, picks, health, retries, circuit, pool, pending.
fn encode_upstream(e: &mut DescriptorEncoder, ws: &[Arc<WorkerMetrics>]) -> fmt::Result {
    counter(
        e,
        "upstream_connect_failures",
        "Failed connection attempts to backends.",
        sum_u64(ws, |w| &w.upstream_connect_failures),
    )?;
    gauge(
        e,
        "upstream_ring_workers",
        "Workers whose upstream TCP runs on their io_uring (io.upstream_io).",
        sum_i64(ws, |w| &w.upstream_ring_workers),
    )?;
    counter(
        e,
        "upstream_ring_ops",
        "io_uring operations (receive, send, shutdown) completed for upstream TCP.",
        sum_u64(ws, |w| &w.upstream_ring_ops),
    )?;
    counter(
        e,
        "upstream_resets",
        "Upstream streams reset by a backend.",
        sum_u64(ws, |w| &w.upstream_resets),
    )?;
    counter(
        e,
        "upstream_timeouts",
        "Upstream requests that timed out.",
        sum_u64(ws, |w| &w.upstream_timeouts),
    )?;
    counter(
        e,
        "balancer_picks",
        "Backend selections made by the load balancer.",
        sum_u64(ws, |w| &w.upstream_picks),
    )?;
    counter(
        e,
        "upstream_health_transitions",
        "Backend health state changes from active checks.",
        sum_u64(ws, |w| &w.health_transitions),
    )?;
    counter(
        e,
        "upstream_ejections",
        "Backends ejected by passive outlier detection.",
        sum_u64(ws, |w| &w.ejections),
    )?;
    counter(
        e,
        "upstream_retries",
        "Requests retried on another attempt.",
        sum_u64(ws, |w| &w.retries),
    )?;
    counter(
        e,
        "upstream_retry_budget_exhausted",
        "Retries skipped because the retry budget was spent.",
        sum_u64(ws, |w| &w.retry_budget_exhausted),
    )?;
    counter(
        e,
        "upstream_circuit_rejections",
        "Requests refused with 503 by circuit breaking (in-flight or pending caps).",
        sum_u64(ws, |w| &w.circuit_rejections),
    )?;
    counter(
        e,
        "upstream_no_healthy_backend",
        "Requests with no healthy backend to go to.",
        sum_u64(ws, |w| &w.no_healthy_backend),
    )?;
    labelled_counter(
        e,
        "upstream_pool_rejected",
        "Requests answered 503 by a busy backend pool: queue_full (circuit.max_pending waiters) or deadline (no stream freed in time).",
        "reason",
        &[
            ("queue_full", sum_u64(ws, |w| &w.pool_rejected_queue_full)),
            ("deadline", sum_u64(ws, |w| &w.pool_rejected_deadline)),
        ],
    )?;
    gauge(
        e,
        "balancer_pending",
        "Requests waiting for a backend slot.",
        sum_i64(ws, |w| &w.pending),
    )?;
    counter(
        e,
        "io_handoffs",
        "Datagrams handed to the worker owning their connection (migration, NAT rebinding).",
        sum_u64(ws, |w| &w.handoffs),
    )?;
    Ok(())
}

/// Hand-overs, pacing, path events and the histograms.
fn encode_paths_and_histograms(
    e: &mut DescriptorEncoder,
    ws: &[Arc<WorkerMetrics>],
) -> fmt::Result {
    counter(
        e,
        "quic_paced_packets",
        "Packets held back by pacing until the time their congestion controller set (quic.pacing).",
        sum_u64(ws, |w| &w.paced),
    )?;
    let mut paths = [("", 0u64); PathEvent::ALL.len()];
    for (i, (slot, ev)) in paths.iter_mut().zip(PathEvent::ALL).enumerate() {
        *slot = (ev.as_str(), sum_u64(ws, |w| &w.path_events[i]));
    }
    labelled_counter(
        e,
        "quic_path_events",
        "QUIC path events: peers that moved (NAT rebinding, migration), and whether the new path validated.",
        "event",
        &paths,
    )?;

    histogram(
        e,
        "request_duration_seconds",
        "HTTP/3 request duration, from the request head to the end of the response.",
        &sum_histogram(ws, |w| &w.request_duration),
    )?;
    histogram(
        e,
        "quic_rtt_seconds",
        "Smoothed RTT of QUIC connections, sampled when each closes.",
        &sum_histogram(ws, |w| &w.quic_rtt),
    )?;
    let mut m = e.encode_descriptor(
        "io_datagrams_per_syscall",
        "UDP datagrams (GRO/GSO segments) moved per receive or send system call.",
        None,
        MetricType::Histogram,
    )?;
    for (dir, h) in [
        ("in", sum_histogram(ws, |w| &w.recv_batch)),
        ("out", sum_histogram(ws, |w| &w.send_batch)),
    ] {
        let labels = [("direction", dir)];
        m.encode_family(&labels)?.encode_histogram::<NoLabels>(
            h.sum(),
            h.count,
            &h.buckets,
            None,
        )?;
    }
    Ok(())
}

/// `spooky_config_reloads_total{result}` and `spooky_config_generation`.
#[derive(Debug)]
struct ReloadCollector(Arc<ReloadStats>);

impl Collector for ReloadCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> fmt::Result {
        let r = &self.0;
        labelled_counter(
            &mut enc,
            "config_reloads",
            "Config reloads attempted, by result (error: the old config stays).",
            "result",
            &[
                ("ok", r.ok.load(Ordering::Relaxed)),
                ("error", r.error.load(Ordering::Relaxed)),
            ],
        )?;
        gauge(
            &mut enc,
            "config_generation",
            "Generation of the config in effect (1 = loaded at start).",
            i64::try_from(r.generation.load(Ordering::Relaxed)).unwrap_or(i64::MAX),
        )
    }
}

/// `spooky_upstream_backend_up{upstream,backend}`: 1 while no worker sees
/// the backend unhealthy or ejected, from the board `/backends` serves.
#[derive(Debug)]
struct BoardCollector(Arc<std::sync::OnceLock<Arc<super::backends::BackendBoard>>>);

impl Collector for BoardCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> fmt::Result {
        let mut m = enc.encode_descriptor(
            "upstream_backend_up",
            "1 while a backend is healthy (or not yet checked) and not ejected on any worker, else 0.",
            None,
            MetricType::Gauge,
        )?;
        let Some(board) = self.0.get() else {
            return Ok(());
        };
        for b in board.aggregated() {
            let addr = b.address.to_string();
            let labels = [
                ("upstream", b.upstream.as_str()),
                ("backend", addr.as_str()),
            ];
            ConstGauge::new(i64::from(b.up())).encode(m.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

/// `spooky_access_log_dropped_total`: 0 until an access log is attached.
#[derive(Debug)]
struct AccessLogCollector(Arc<std::sync::OnceLock<Arc<super::access::AccessLogStats>>>);

impl Collector for AccessLogCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> fmt::Result {
        counter(
            &mut enc,
            "access_log_dropped",
            "Access-log lines dropped: the writer thread fell behind (queue full) or could not write.",
            self.0.get().map_or(0, |s| s.dropped()),
        )
    }
}

/// `spooky_build_info{version="…"} 1`.
#[derive(Debug)]
struct BuildInfo;

impl Collector for BuildInfo {
    fn encode(&self, mut enc: DescriptorEncoder) -> fmt::Result {
        let mut m = enc.encode_descriptor(
            "build_info",
            "Build information; always 1.",
            None,
            MetricType::Gauge,
        )?;
        let labels = [("version", env!("CARGO_PKG_VERSION"))];
        ConstGauge::new(1i64).encode(m.encode_family(&labels)?)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn bumped() -> Arc<MetricsRegistry> {
        let reg = MetricsRegistry::new();
        let a = reg.add_worker();
        let b = reg.add_worker();
        WorkerMetrics::add(&a.conns_opened, 3);
        WorkerMetrics::add(&b.conns_opened, 4);
        a.conns_active.fetch_add(2, Ordering::Relaxed);
        b.conns_active.fetch_add(5, Ordering::Relaxed);
        b.conns_active.fetch_sub(1, Ordering::Relaxed);
        a.dropped(DropReason::OverCapacity);
        b.dropped(DropReason::OverCapacity);
        b.dropped(DropReason::Malformed);
        WorkerMetrics::add(&a.bytes_in, 1000);
        WorkerMetrics::add(&b.bytes_in, 234);
        WorkerMetrics::add(&b.bytes_out, 99);
        a.request_done(200);
        b.request_done(204);
        b.request_done(503);
        a.request_done(0);
        WorkerMetrics::inc(&a.upstream_picks);
        WorkerMetrics::inc(&b.upstream_picks);
        a.request_finished(200, Some(std::time::Duration::from_millis(3)));
        b.request_finished(200, Some(std::time::Duration::from_millis(40)));
        a.quic_rtt.observe(0.0002);
        a.recv_batch.observe(3.0);
        b.send_batch.observe(64.0);
        reg.reload_stats().ok.fetch_add(1, Ordering::Relaxed);
        reg.reload_stats().generation.store(2, Ordering::Relaxed);
        let (b1, b2) = (backend_addr(9001), backend_addr(9002));
        let rr = crate::config::Policy::RoundRobin;
        a.obs.routed(1, "app", b1, rr);
        b.obs.routed(2, "app", b1, rr);
        b.obs.routed(3, "app", b2, rr);
        a.obs
            .backends
            .attempt_done("app", b1, rr, Some(200), Duration::from_millis(2));
        b.obs
            .backends
            .attempt_done("app", b1, rr, Some(503), Duration::from_millis(20));
        b.obs
            .backends
            .attempt_done("app", b2, rr, None, Duration::from_millis(1));
        b.obs.retried(3, "app", b2, rr, 1);
        a.obs.ejected("app", b2, rr, Duration::from_secs(10));
        WorkerMetrics::inc(&a.obs.closed_by_reason[1]);
        WorkerMetrics::add(&a.obs.packets_lost, 3);
        a.obs.handshake_done(1, Duration::from_millis(2));
        a.obs
            .path_sampled(20_000, 5_000, Duration::from_micros(300));
        b.obs
            .path_sampled(70_000, 60_000, Duration::from_micros(700));
        reg
    }

    fn backend_addr(port: u16) -> std::net::SocketAddr {
        std::net::SocketAddr::from(([127, 0, 0, 1], port))
    }

    /// Every configured backend gets its own series, summed over workers.
    #[test]
    fn per_backend_series() {
        let text = bumped().render();
        for line in [
            "spooky_balancer_backend_picks_total{upstream=\"app\",backend=\"127.0.0.1:9001\",policy=\"round_robin\"} 2",
            "spooky_balancer_backend_picks_total{upstream=\"app\",backend=\"127.0.0.1:9002\",policy=\"round_robin\"} 1",
            "spooky_upstream_backend_responses_total{upstream=\"app\",backend=\"127.0.0.1:9001\",class=\"2xx\"} 1",
            "spooky_upstream_backend_responses_total{upstream=\"app\",backend=\"127.0.0.1:9001\",class=\"5xx\"} 1",
            "spooky_upstream_backend_responses_total{upstream=\"app\",backend=\"127.0.0.1:9002\",class=\"error\"} 1",
            "spooky_upstream_backend_retries_total{upstream=\"app\",backend=\"127.0.0.1:9002\"} 1",
            "spooky_upstream_backend_ejections_total{upstream=\"app\",backend=\"127.0.0.1:9002\"} 1",
            "spooky_upstream_backend_duration_seconds_count{upstream=\"app\",backend=\"127.0.0.1:9001\"} 2",
            "spooky_upstream_backend_duration_seconds_sum{upstream=\"app\",backend=\"127.0.0.1:9001\"} 0.022",
            "spooky_quic_connections_closed_by_reason_total{reason=\"idle_timeout\"} 1",
            "spooky_quic_packets_lost_total 3",
            "spooky_quic_handshake_duration_seconds_count 1",
            "spooky_quic_sampled_congestion_window_bytes_count 2",
            "spooky_quic_sampled_congestion_window_bytes_sum 90000.0",
            "spooky_quic_sampled_congestion_window_bytes_bucket{le=\"65536.0\"} 1",
            "spooky_quic_sampled_in_flight_bytes_count 2",
            "spooky_quic_sampled_in_flight_bytes_sum 65000.0",
            "spooky_quic_sampled_in_flight_bytes_bucket{le=\"16384.0\"} 1",
            "spooky_quic_sampled_rtt_seconds_count 2",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line:?} in:\n{text}");
        }
    }

    /// A reload that removes a backend removes its series.
    #[test]
    fn removed_backends_leave() {
        let reg = bumped();
        for w in reg.workers.lock().iter() {
            w.obs.backends.retain(|_, a| a.port() == 9001);
        }
        let text = reg.render();
        assert!(text.contains("backend=\"127.0.0.1:9001\""));
        assert!(!text.contains("backend=\"127.0.0.1:9002\""), "{text}");
    }

    #[test]
    fn sums_across_workers() {
        let text = bumped().render();
        for line in [
            "# TYPE spooky_quic_connections_opened counter",
            "spooky_quic_connections_opened_total 7",
            "# TYPE spooky_quic_connections_active gauge",
            "spooky_quic_connections_active 6",
            "spooky_quic_datagrams_dropped_total{reason=\"over_capacity\"} 2",
            "spooky_quic_datagrams_dropped_total{reason=\"malformed\"} 1",
            "spooky_quic_datagrams_dropped_total{reason=\"invalid_token\"} 0",
            "spooky_io_bytes_total{direction=\"in\"} 1234",
            "spooky_io_bytes_total{direction=\"out\"} 99",
            "spooky_requests_total{class=\"2xx\"} 4",
            "# TYPE spooky_request_duration_seconds histogram",
            "spooky_request_duration_seconds_count 2",
            "spooky_request_duration_seconds_bucket{le=\"0.0025\"} 0",
            "spooky_request_duration_seconds_bucket{le=\"0.005\"} 1",
            "spooky_request_duration_seconds_bucket{le=\"0.05\"} 2",
            "spooky_request_duration_seconds_bucket{le=\"+Inf\"} 2",
            "spooky_request_duration_seconds_sum 0.043",
            "spooky_quic_rtt_seconds_count 1",
            "spooky_io_datagrams_per_syscall_bucket{le=\"4.0\",direction=\"in\"} 1",
            "spooky_io_datagrams_per_syscall_bucket{le=\"64.0\",direction=\"out\"} 1",
            "spooky_io_datagrams_per_syscall_sum{direction=\"out\"} 64.0",
            "spooky_config_reloads_total{result=\"ok\"} 1",
            "spooky_config_reloads_total{result=\"error\"} 0",
            "spooky_config_generation 2",
            "spooky_requests_total{class=\"5xx\"} 1",
            "spooky_requests_total{class=\"aborted\"} 1",
            "spooky_requests_total{class=\"1xx\"} 0",
            "spooky_requests_in_flight 0",
            "spooky_balancer_picks_total 2",
            "spooky_upstream_timeouts_total 0",
            "# HELP spooky_io_send_errors UDP sends that failed.",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing line {line:?} in:\n{text}"
            );
        }
        let build = format!(
            "spooky_build_info{{version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        );
        assert!(text.lines().any(|l| l == build), "{text}");
        assert!(text.ends_with("# EOF\n"), "{text}");
    }

    #[test]
    fn every_family_present() {
        let text = MetricsRegistry::new().render();
        for (name, ty) in [
            ("quic_connections_active", "gauge"),
            ("quic_connections_opened", "counter"),
            ("quic_connections_closed", "counter"),
            ("quic_handshakes", "counter"),
            ("quic_handshake_failures", "counter"),
            ("quic_retries_sent", "counter"),
            ("quic_half_open_connections", "gauge"),
            ("quic_handshake_timeouts", "counter"),
            ("quic_icmp_unreachable", "counter"),
            ("quic_unreachable_closes", "counter"),
            ("quic_version_negotiations", "counter"),
            ("quic_datagrams_dropped", "counter"),
            ("io_datagrams", "counter"),
            ("io_bytes", "counter"),
            ("io_syscalls", "counter"),
            ("io_gso_fallbacks", "counter"),
            ("io_send_errors", "counter"),
            ("io_ring_submissions", "counter"),
            ("quic_paced_packets", "counter"),
            ("quic_path_events", "counter"),
            ("io_ring_completions", "counter"),
            ("io_recv_buffers_exhausted", "counter"),
            ("io_recv_truncated", "counter"),
            ("requests", "counter"),
            ("requests_in_flight", "gauge"),
            ("requests_malformed", "counter"),
            ("requests_client_cancelled", "counter"),
            ("requests_cancelled_before_dispatch", "counter"),
            ("quic_abandoned_stream_closes", "counter"),
            ("upstream_connect_failures", "counter"),
            ("upstream_resets", "counter"),
            ("upstream_ring_workers", "gauge"),
            ("upstream_ring_ops", "counter"),
            ("upstream_timeouts", "counter"),
            ("upstream_pool_rejected", "counter"),
            ("balancer_picks", "counter"),
            ("request_duration_seconds", "histogram"),
            ("quic_rtt_seconds", "histogram"),
            ("io_datagrams_per_syscall", "histogram"),
            ("quic_sampled_congestion_window_bytes", "histogram"),
            ("quic_sampled_in_flight_bytes", "histogram"),
            ("quic_sampled_rtt_seconds", "histogram"),
            ("config_reloads", "counter"),
            ("config_generation", "gauge"),
            ("access_log_dropped", "counter"),
            ("build_info", "gauge"),
        ] {
            let t = format!("# TYPE spooky_{name} {ty}");
            assert!(text.lines().any(|l| l == t), "missing {t:?} in:\n{text}");
            let h = format!("# HELP spooky_{name} ");
            assert!(
                text.lines().any(|l| l.starts_with(&h)),
                "no HELP for {name}"
            );
        }
        // No workers yet: every series is still there, at zero.
        assert!(text
            .lines()
            .any(|l| l == "spooky_quic_connections_opened_total 0"));
        assert!(text.ends_with("# EOF\n"));
    }

    /// `promtool check metrics` (Debian package `prometheus`) lints the
    /// Prometheus text format `/metrics` serves to scrapers that do not ask
    /// for OpenMetrics; it must pass with exit 0 and no lint. Skipped where
    /// promtool is not installed.
    #[test]
    fn promtool_accepts_output() {
        use std::io::Write;
        use std::process::{Command, Stdio};

        let reg = bumped();
        // Per-backend series too, so their families are linted as well.
        let text = reg.render_as(super::super::exposition::Format::PrometheusText);
        let child = Command::new("promtool")
            .args(["check", "metrics"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn();
        let mut child = match child {
            Ok(c) => c,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                println!("promtool not found; skipping `promtool check metrics`");
                return;
            }
            Err(e) => panic!("spawning promtool: {e}"),
        };
        child
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && stdout.trim().is_empty() && stderr.trim().is_empty(),
            "promtool check metrics: {:?}\nstdout: {stdout}\nstderr: {stderr}\ninput:\n{text}",
            out.status.code()
        );
    }
}
