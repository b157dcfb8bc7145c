//! The worker: drives one [`Edge`] over one [`DatagramIo`] driver on a
//! current-thread tokio runtime, spawns an upstream task per request, and
//! handles shutdown. This is the only place where the sans-IO edge meets
//! sockets and clocks.

use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use spooky_uring::{DatagramIo, RecvMeta, Transmit, MAX_RECV_BUF};
use tokio::sync::{mpsc, watch};

use crate::config::Config;
use crate::edge::{Edge, EdgeError, EdgeEvent};
use crate::telemetry::WorkerMetrics;
use crate::upstream::{proxy, Gateway};

/// Errors that stop a worker.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("socket: {0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Edge(#[from] EdgeError),
}

/// How long in-flight requests get to finish after a shutdown signal.
pub const DRAIN_GRACE: Duration = Duration::from_secs(10);
/// How long closing connections then get to flush their CONNECTION_CLOSE.
pub const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// Runs one worker until `shutdown` turns true, then closes connections
/// cleanly (CONNECTION_CLOSE with H3_NO_ERROR) and returns.
pub async fn run_worker<D: DatagramIo>(
    cfg: &Config,
    mut io: D,
    metrics: Arc<WorkerMetrics>,
    board: Arc<crate::telemetry::backends::BackendBoard>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), RuntimeError> {
    let local = io.local_addr()?;
    let caps = io.capabilities();
    tracing::info!(
        address = %local,
        driver = caps.driver,
        gso_segments = caps.max_gso_segments,
        gro_segments = caps.gro_segments,
        "worker listening"
    );
    let (to_edge_tx, mut to_edge_rx) = mpsc::unbounded_channel();
    let mut edge = Edge::new(cfg, to_edge_tx, metrics.clone())?;
    let gateway = Rc::new(Gateway::new(cfg));
    gateway.warm();
    let _checkers = gateway.start_health_checks(metrics.clone(), board, 0);

    let batch = cfg.io.batch.clamp(1, 1024);
    let mut bufs: Vec<Vec<u8>> = (0..batch.min(64))
        .map(|_| vec![0u8; MAX_RECV_BUF])
        .collect();
    let mut metas = vec![
        RecvMeta {
            peer: local,
            local_ip: None,
            len: 0,
            stride: 0,
        };
        bufs.len()
    ];
    let mut out = vec![0u8; MAX_RECV_BUF];
    let mut closing_since: Option<Instant> = None;
    let mut forced = false;
    let mut last_counters = io.counters();

    loop {
        // Outputs first: spawn new requests, then flush packets.
        while let Some(ev) = edge.poll_event() {
            match ev {
                EdgeEvent::Request { envelope, side } => {
                    tokio::task::spawn_local(proxy(
                        gateway.clone(),
                        envelope,
                        side,
                        metrics.clone(),
                    ));
                }
            }
        }
        flush(&mut edge, &mut io, &mut out, local).await;
        publish_io_counters(&io, &metrics, &mut last_counters);

        if let Some(since) = closing_since {
            if edge.connections() == 0 || since.elapsed() > DRAIN_GRACE + CLOSE_GRACE {
                tracing::info!(remaining = edge.connections(), "worker stopped");
                return Ok(());
            }
            if since.elapsed() > DRAIN_GRACE && !forced {
                tracing::warn!(
                    connections = edge.connections(),
                    requests = edge.requests_in_flight(),
                    "drain deadline passed; closing remaining connections"
                );
                edge.force_close_all();
                forced = true;
                continue;
            }
        }

        let timer = edge.poll_timeout();
        let sleep_until = timer.unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
        let closing_tick = closing_since.map(|_| Instant::now() + Duration::from_millis(50));
        let wake = closing_tick.map_or(sleep_until, |c| c.min(sleep_until));
        tokio::select! {
            r = io.readable() => {
                r?;
                let now = Instant::now();
                // Drain the socket, bounded so upstream events are not starved.
                for _ in 0..16 {
                    match io.try_recv_batch(&mut bufs, &mut metas) {
                        Ok(n) => {
                            for (buf, meta) in bufs.iter_mut().zip(metas.iter()).take(n) {
                                let to = meta
                                    .local_ip
                                    .map(|ip| SocketAddr::new(ip, local.port()))
                                    .unwrap_or(local);
                                let stride = meta.stride.max(1);
                                let mut off = 0;
                                while off < meta.len {
                                    let end = (off + stride).min(meta.len);
                                    edge.handle_datagram(now, &mut buf[off..end], meta.peer, to);
                                    off = end;
                                }
                            }
                            if n < bufs.len() {
                                break;
                            }
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                        Err(e) => {
                            // ICMP errors surface here on some kernels; never fatal.
                            tracing::debug!(error = %e, "recv error");
                            break;
                        }
                    }
                }
                // A socket that stays readable must not starve upstream
                // events or timers: serve both before polling it again.
                for _ in 0..1024 {
                    match to_edge_rx.try_recv() {
                        Ok((key, msg)) => edge.handle_upstream(now, key, msg),
                        Err(_) => break,
                    }
                }
                if edge.poll_timeout().is_some_and(|t| t <= Instant::now()) {
                    edge.handle_timeout(Instant::now());
                }
            }
            Some((key, msg)) = to_edge_rx.recv() => {
                let now = Instant::now();
                edge.handle_upstream(now, key, msg);
                // Take whatever else is queued in one go.
                for _ in 0..1024 {
                    match to_edge_rx.try_recv() {
                        Ok((key, msg)) => edge.handle_upstream(now, key, msg),
                        Err(_) => break,
                    }
                }
            }
            _ = tokio::time::sleep_until(wake.into()) => {
                edge.handle_timeout(Instant::now());
            }
            r = shutdown.changed(), if closing_since.is_none() => {
                if r.is_err() || *shutdown.borrow() {
                    tracing::info!(
                        connections = edge.connections(),
                        requests = edge.requests_in_flight(),
                        "draining: GOAWAY sent, refusing new connections"
                    );
                    edge.close_all(Instant::now());
                    closing_since = Some(Instant::now());
                }
            }
        }
    }
}

/// Sends everything the edge has queued, one GSO train per syscall.
async fn flush<D: DatagramIo>(edge: &mut Edge, io: &mut D, out: &mut [u8], local: SocketAddr) {
    let max_segments = io.capabilities().max_gso_segments;
    while let Some(t) = edge.poll_transmit(out, max_segments) {
        let from_ip = if local.ip().is_unspecified() {
            Some(t.from.ip())
        } else {
            None
        };
        let transmit = Transmit {
            destination: t.to,
            src_ip: from_ip,
            contents: &out[..t.len],
            segment_size: if t.len > t.segment_size {
                Some(t.segment_size)
            } else {
                None
            },
        };
        loop {
            match io.try_send(&transmit) {
                Ok(()) => break,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if io.writable().await.is_err() {
                        break;
                    }
                }
                Err(e) => {
                    tracing::debug!(error = %e, "send failed");
                    break;
                }
            }
        }
    }
}

fn publish_io_counters<D: DatagramIo>(
    io: &D,
    metrics: &WorkerMetrics,
    last: &mut spooky_uring::IoCounters,
) {
    let c = io.counters();
    WorkerMetrics::add(&metrics.recv_syscalls, c.recv_syscalls - last.recv_syscalls);
    WorkerMetrics::add(&metrics.send_syscalls, c.send_syscalls - last.send_syscalls);
    WorkerMetrics::add(&metrics.gso_fallbacks, c.gso_fallbacks - last.gso_fallbacks);
    WorkerMetrics::add(&metrics.send_errors, c.send_errors - last.send_errors);
    *last = c;
}
