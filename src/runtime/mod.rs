//! The worker: drives one [`Edge`] over one [`DatagramIo`] driver on a
//! current-thread tokio runtime, spawns an upstream task per request, and
//! handles shutdown. This is the only place where the sans-IO edge meets
//! sockets and clocks.

pub mod fault;

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use spooky_uring::errqueue::Unreachable;
use spooky_uring::{DatagramIo, SendMeta};
use tokio::sync::{mpsc, watch};

use crate::config::Config;
use crate::control::reload::ConfigStore;
use crate::edge::{Edge, EdgeError, PATH_SAMPLE_INTERVAL};
use crate::router::bridge::{RequestKey, ToEdge};
use crate::source::SystemSource;
use crate::telemetry::access::AccessSink;
use crate::telemetry::backends::BackendBoard;
use crate::telemetry::WorkerMetrics;
use crate::upstream::driver::RequestPath;
use crate::upstream::{Connector, Gateway, Registry};

/// Errors that stop a worker.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("socket: {0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Edge(#[from] EdgeError),
    /// `SPOOKY_FAULT_INJECT=error_worker:…` (debug builds, see [`fault`]).
    #[error("fault injected into worker {0}")]
    FaultInjected(usize),
}

/// How long in-flight requests get to finish after a shutdown signal.
pub const DRAIN_GRACE: Duration = Duration::from_secs(10);
/// How long closing connections then get to flush their CONNECTION_CLOSE.
pub const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// What a worker shares with the rest of the process.
#[derive(Debug)]
pub struct WorkerContext {
    /// Index of this worker (labels `/backends` entries; octet 3 of its CIDs).
    pub id: usize,
    /// Datagrams other workers received for this worker's connections, and
    /// the senders to hand ours to them.
    pub handoff: Handoff,
    pub config: Arc<ConfigStore>,
    pub metrics: Arc<WorkerMetrics>,
    pub board: Arc<BackendBoard>,
    /// This worker's end of the access log (none: no access lines).
    pub access: Option<AccessSink>,
}

/// What one worker hands another.
#[derive(Debug)]
pub enum Forwarded {
    /// A datagram received for a connection the other worker owns.
    Datagram {
        data: Vec<u8>,
        from: SocketAddr,
        to: SocketAddr,
    },
    /// ICMP unreachable reports that no connection of the worker whose
    /// socket got them matched (the kernel picks that socket by hashing
    /// the 4-tuple, not by connection id): sent to every other worker.
    Unreachable(Vec<Unreachable>),
}

/// The hand-over channels between workers.
#[derive(Debug)]
pub struct Handoff {
    pub rx: mpsc::UnboundedReceiver<Forwarded>,
    /// One sender per worker, indexed by worker id.
    pub peers: Arc<Vec<mpsc::UnboundedSender<Forwarded>>>,
}

impl Handoff {
    /// Channels for `n` workers, in worker order.
    pub fn mesh(n: usize) -> Vec<Handoff> {
        let (txs, rxs): (Vec<_>, Vec<_>) = (0..n).map(|_| mpsc::unbounded_channel()).unzip();
        let peers = Arc::new(txs);
        rxs.into_iter()
            .map(|rx| Handoff {
                rx,
                peers: peers.clone(),
            })
            .collect()
    }
}

/// Runs one worker until `shutdown` turns true, then closes connections
/// cleanly (CONNECTION_CLOSE with H3_NO_ERROR) and returns.
///
/// When the [`ConfigStore`] publishes a new generation, the worker picks it
/// up at the top of its loop: new requests go to a new [`Gateway`] (routes,
/// policies, backends, timeouts), while requests in flight keep the
/// `Rc<Gateway>` they captured and finish on it. The worker's [`Registry`]
/// carries each backend that stays (its health, ejection, EWMA, retry budget
/// and warm connections) into the new gateway; a removed backend's pool and
/// h2 connections go away with the last request that uses them. The edge
/// takes the new TLS pair and transport parameters for new handshakes and
/// the new limits.
pub async fn run_worker<D: DatagramIo>(
    ctx: WorkerContext,
    io: D,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), RuntimeError> {
    let (mut w, mut handoff_rx, mut config_rx) = Worker::start(ctx, io)?;
    let mut config_pending = false;
    let mut closing_since: Option<Instant> = None;
    let mut forced = false;
    // Debug builds only: a planned failure of this worker (`fault`).
    let fault = fault::for_worker(w.id);
    let fault_at = fault.map(|f| Instant::now() + f.after);

    loop {
        w.next_path_sample = sample_if_due(&mut w.edge, w.next_path_sample);
        // A new config generation applies from here on, to new requests.
        // (`has_changed` is one atomic load; `config_pending` covers a change
        // the `select!` below already consumed.)
        if config_pending || config_rx.has_changed().unwrap_or(false) {
            config_pending = false;
            config_rx.mark_unchanged();
            w.apply_new_generation();
        }
        // Outputs first: requests move, then packets go out. Requests that
        // ran have woken their h2 connections' tasks: let those write (on
        // the ring: queue their operations) before the flush, so one submit
        // carries everything.
        if w.exchange() {
            tokio::task::yield_now().await;
            w.exchange();
        }
        flush(&mut w.edge, &mut w.io, w.local, &w.metrics).await;
        w.after_flush();

        if let Some(since) = closing_since {
            match drain_step(&mut w.edge, since, &mut forced) {
                DrainStep::Stop => return Ok(()),
                DrainStep::Again => continue,
                DrainStep::Wait => {}
            }
        }

        let wake = w.wake_at(closing_since);
        tokio::select! {
            Some(f) = handoff_rx.recv() => {
                let now = Instant::now();
                take_handed_over(&mut w.edge, now, f);
                while let Ok(f) = handoff_rx.try_recv() {
                    take_handed_over(&mut w.edge, now, f);
                }
            }
            r = w.io.readable() => {
                r?;
                w.on_readable();
            }
            // A request can move (h2, a timer or a pool woke it): the top
            // of the loop runs it.
            _ = w.path.ready() => {}
            _ = tokio::time::sleep_until(wake.into()) => {
                w.edge.handle_timeout(Instant::now());
            }
            // Wakes the loop; the top of the loop applies the new generation.
            r = config_rx.changed() => {
                config_pending = true;
                if r.is_err() {
                    // The store is gone (process exiting): stop watching it.
                    config_rx = watch::channel(w.generation).1;
                }
            }
            _ = sleep_until_opt(fault_at), if fault_at.is_some() => {
                return inject(fault, w.id);
            }
            r = shutdown.changed(), if closing_since.is_none() => {
                if r.is_err() || *shutdown.borrow() {
                    tracing::info!(
                        connections = w.edge.connections(),
                        requests = w.edge.requests_in_flight(),
                        "draining: GOAWAY sent, refusing new connections"
                    );
                    w.edge.close_all(Instant::now());
                    closing_since = Some(Instant::now());
                }
            }
        }
    }
}

/// What a draining worker does next.
enum DrainStep {
    /// Every connection is gone, or the grace periods are over.
    Stop,
    /// The drain deadline just passed and connections were closed: flush.
    Again,
    /// Keep serving what is left.
    Wait,
}

fn drain_step(edge: &mut Edge, since: Instant, forced: &mut bool) -> DrainStep {
    if edge.connections() == 0 || since.elapsed() > DRAIN_GRACE + CLOSE_GRACE {
        tracing::info!(remaining = edge.connections(), "worker stopped");
        return DrainStep::Stop;
    }
    if since.elapsed() > DRAIN_GRACE && !*forced {
        tracing::warn!(
            connections = edge.connections(),
            requests = edge.requests_in_flight(),
            "drain deadline passed; closing remaining connections"
        );
        edge.force_close_all();
        *forced = true;
        return DrainStep::Again;
    }
    DrainStep::Wait
}

/// One worker's state between turns of its loop ([`run_worker`]).
struct Worker<D: DatagramIo> {
    id: usize,
    io: D,
    local: SocketAddr,
    /// Datagrams/trains taken per receive call (io.batch; at most 64, the
    /// epoll driver's recvmmsg batch).
    batch: usize,
    edge: Edge,
    /// The requests in flight, driven by this loop.
    path: RequestPath,
    /// Response events on their way to the edge (reused buffer).
    responses: VecDeque<(RequestKey, ToEdge)>,
    connector: Connector,
    /// Backend state (health, ejections, EWMA, budgets, warm connections),
    /// across config generations.
    registry: Registry,
    gateway: Rc<Gateway>,
    store: Arc<ConfigStore>,
    generation: u64,
    metrics: Arc<WorkerMetrics>,
    board: Arc<BackendBoard>,
    peers: Arc<Vec<mpsc::UnboundedSender<Forwarded>>>,
    last_counters: spooky_uring::IoCounters,
    last_ring_ops: u64,
    unreachable: Vec<Unreachable>,
    next_path_sample: Instant,
}

type Start<D> = (
    Worker<D>,
    mpsc::UnboundedReceiver<Forwarded>,
    watch::Receiver<u64>,
);

impl<D: DatagramIo> Worker<D> {
    /// Builds the worker's edge and gateway from the current generation.
    fn start(ctx: WorkerContext, io: D) -> Result<Start<D>, RuntimeError> {
        let WorkerContext {
            id,
            handoff,
            config: store,
            metrics,
            board,
            access,
        } = ctx;
        let mut config_rx = store.subscribe();
        config_rx.mark_unchanged();
        let snapshot = store.current();
        let cfg: &Config = &snapshot.config;
        let local = io.local_addr()?;
        let caps = io.capabilities();
        // Upstream TCP rides the driver's ring when it has one and the
        // config asks for it; fixed for the worker's life (`io.*` needs a
        // restart).
        let connector = Connector::for_worker(cfg.io.upstream_io, io.tcp_ring());
        metrics
            .upstream_ring_workers
            .store(i64::from(connector.ring().is_some()), Ordering::Relaxed);
        tracing::info!(
            address = %local,
            driver = caps.driver,
            upstream_io = connector.name(),
            gso_segments = caps.max_gso_segments,
            gro_segments = caps.gro_segments,
            "worker listening"
        );
        let mut edge = Edge::new(
            cfg,
            id.min(255) as u8,
            metrics.clone(),
            Box::new(SystemSource),
            Instant::now(),
        )?;
        if let Some(sink) = access {
            edge.set_access_log(sink);
        }
        let mut registry = Registry::default();
        let gateway = Rc::new(registry.gateway(cfg, &connector));
        gateway.warm();
        registry.start_health_checks(&metrics, &board, id);
        let last_counters = io.counters();
        let w = Worker {
            id,
            io,
            local,
            batch: cfg.io.batch.clamp(1, 64),
            edge,
            path: RequestPath::new(
                metrics.clone(),
                cfg.limits.initial_body_buffer_bytes,
                cfg.limits.max_body_buffer_bytes,
            ),
            responses: VecDeque::new(),
            connector,
            registry,
            gateway,
            store,
            generation: snapshot.generation,
            metrics,
            board,
            peers: handoff.peers,
            last_counters,
            last_ring_ops: 0,
            unreachable: Vec::new(),
            next_path_sample: Instant::now() + PATH_SAMPLE_INTERVAL,
        };
        Ok((w, handoff.rx, config_rx))
    }

    /// Switches to the store's generation when it is a new one.
    fn apply_new_generation(&mut self) {
        let snap = self.store.current();
        if snap.generation == self.generation {
            return;
        }
        self.generation = snap.generation;
        let cfg = &snap.config;
        let generation = self.generation;
        if let Err(e) = self.edge.reconfigure(cfg) {
            // The control plane loaded this TLS pair before publishing; the
            // files changed since. Keep serving with the previous one.
            tracing::error!(generation, error = %e, "reload: keeping the previous TLS and transport config");
        }
        // Backends that stay keep their pools, checkers and state; removed
        // ones lose their checker, so their pools go away with the last
        // request of the old generation that uses them.
        self.path.set_limits(
            cfg.limits.initial_body_buffer_bytes,
            cfg.limits.max_body_buffer_bytes,
        );
        let fresh = Rc::new(self.registry.gateway(cfg, &self.connector));
        fresh.warm();
        self.registry
            .start_health_checks(&self.metrics, &self.board, self.id);
        let old = std::mem::replace(&mut self.gateway, fresh);
        tracing::info!(
            worker = self.id,
            generation,
            in_flight_on_previous = Rc::strong_count(&old) - 1,
            "worker switched to new config"
        );
        drop(old);
        self.board.retain(|upstream, addr| {
            cfg.upstreams
                .iter()
                .any(|u| u.name == upstream && u.backends.iter().any(|b| b.address == *addr))
        });
    }

    /// Moves requests along: the edge's request events to the request
    /// path, the requests that can move polled, their response events back
    /// to the edge; again while anything moved (bounded, so one busy batch
    /// cannot starve the socket and timers).
    /// True when a request was polled.
    fn exchange(&mut self) -> bool {
        let now = Instant::now();
        let mut polled = false;
        for _ in 0..16 {
            let mut moved = false;
            while let Some(ev) = self.edge.poll_event() {
                moved = true;
                self.path.handle(ev.key, ev.event, &self.gateway);
            }
            let polls = self.path.run();
            polled |= polls > 0;
            moved |= polls > 0;
            self.path.take_output(&mut self.responses);
            for (key, msg) in self.responses.drain(..) {
                moved = true;
                self.edge.handle_upstream(now, key, msg);
            }
            if !moved {
                break;
            }
        }
        polled
    }

    /// What follows a flush: ICMP reports the send met, I/O counters.
    fn after_flush(&mut self) {
        take_unreachable(
            &mut self.edge,
            &mut self.io,
            &self.peers,
            self.id,
            &mut self.unreachable,
        );
        publish_io_counters(&self.io, &self.metrics, &mut self.last_counters);
        if let Some(ring) = self.connector.ring() {
            let ops = ring.stats().completions;
            WorkerMetrics::add(&self.metrics.upstream_ring_ops, ops - self.last_ring_ops);
            self.last_ring_ops = ops;
        }
    }

    /// When the loop must wake up even if nothing arrives.
    fn wake_at(&mut self, closing_since: Option<Instant>) -> Instant {
        let timer = self.edge.poll_timeout();
        let sleep_until = timer.unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
        let closing_tick = closing_since.map(|_| Instant::now() + Duration::from_millis(50));
        let mut wake = closing_tick.map_or(sleep_until, |c| c.min(sleep_until));
        if self.edge.connections() > 0 {
            // Open connections are sampled on time even when idle.
            wake = wake.min(self.next_path_sample);
        }
        wake
    }

    /// The socket is readable: drains it (bounded), then serves upstream
    /// events and due timers so a socket that stays readable starves
    /// neither.
    fn on_readable(&mut self) {
        let now = Instant::now();
        for _ in 0..16 {
            if !self.recv_batch(now) {
                break;
            }
        }
        if self
            .edge
            .poll_timeout()
            .is_some_and(|t| t <= Instant::now())
        {
            self.edge.handle_timeout(Instant::now());
        }
    }

    /// One receive call; true when a full batch came (more may wait).
    fn recv_batch(&mut self, now: Instant) -> bool {
        let Worker {
            io,
            edge,
            peers,
            metrics,
            local,
            batch,
            ..
        } = self;
        let (local, batch) = (*local, *batch);
        let driver = io.capabilities().driver;
        let (mut datagrams, mut bytes) = (0usize, 0usize);
        let got = io.recv_with(batch, |meta, buf| {
            datagrams += meta.segments();
            bytes += meta.len;
            let to = meta
                .local_ip
                .map(|ip| SocketAddr::new(ip, local.port()))
                .unwrap_or(local);
            let stride = meta.stride.max(1);
            let mut off = 0;
            while off < meta.len {
                let end = (off + stride).min(meta.len);
                if let Some(owner) = edge.handle_datagram(now, &mut buf[off..end], meta.peer, to) {
                    // Another worker's connection: hand it over.
                    if let Some(tx) = peers.get(usize::from(owner)) {
                        WorkerMetrics::inc(&metrics.handoffs);
                        let _ = tx.send(Forwarded::Datagram {
                            data: buf[off..end].to_vec(),
                            from: meta.peer,
                            to,
                        });
                    }
                }
                off = end;
            }
        });
        match got {
            Ok(n) => {
                if n > 0 {
                    metrics.recv_batch.observe(datagrams as f64);
                    crate::telemetry::probes::io_recv_batch(datagrams, bytes, driver);
                }
                n >= batch
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => true,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => false,
            Err(e) => {
                // ICMP errors surface here on some kernels; never fatal.
                tracing::debug!(error = %e, "recv error");
                false
            }
        }
    }
}

/// Something another worker handed over. The receiver never hands it on
/// again: a CID naming this worker that it does not know is dropped, and
/// so is a report that matches none of its connections.
fn take_handed_over(edge: &mut Edge, now: Instant, f: Forwarded) {
    match f {
        Forwarded::Datagram { mut data, from, to } => {
            let _ = edge.handle_datagram(now, &mut data, from, to);
        }
        Forwarded::Unreachable(reports) => {
            let _ = edge.handle_unreachable(now, &reports);
        }
    }
}

/// Hands the ICMP unreachable reports the driver read (after a send or
/// receive met the socket's pending ICMP error) to the edge, and those no
/// connection here matched to the other workers.
fn take_unreachable<D: DatagramIo>(
    edge: &mut Edge,
    io: &mut D,
    peers: &[mpsc::UnboundedSender<Forwarded>],
    worker_id: usize,
    reports: &mut Vec<Unreachable>,
) {
    io.take_unreachable(reports);
    if reports.is_empty() {
        return;
    }
    let unmatched = edge.handle_unreachable(Instant::now(), reports);
    reports.clear();
    if unmatched.is_empty() {
        return;
    }
    for (id, tx) in peers.iter().enumerate() {
        if id != worker_id {
            let _ = tx.send(Forwarded::Unreachable(unmatched.clone()));
        }
    }
}

/// Samples open connections' paths when `due` has passed (see
/// [`Edge::sample_paths`]); returns when the next sample is due.
fn sample_if_due(edge: &mut Edge, due: Instant) -> Instant {
    let now = Instant::now();
    if now < due {
        return due;
    }
    edge.sample_paths();
    now + PATH_SAMPLE_INTERVAL
}

/// Sleeps until `at`; never wakes when there is none.
async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

/// Carries out an injected fault (debug builds plan them, see [`fault`]).
fn inject(fault: Option<fault::Fault>, worker_id: usize) -> Result<(), RuntimeError> {
    match fault.map(|f| f.kind) {
        Some(fault::FaultKind::Panic) => panic!("fault injected into worker {worker_id}"),
        _ => Err(RuntimeError::FaultInjected(worker_id)),
    }
}

/// Sends everything the edge has queued, one GSO train per syscall.
async fn flush<D: DatagramIo>(
    edge: &mut Edge,
    io: &mut D,
    local: SocketAddr,
    metrics: &WorkerMetrics,
) {
    let max_segments = io.capabilities().max_gso_segments;
    let driver = io.capabilities().driver;
    // Each train is encrypted straight into the driver's send buffer: the
    // bytes quiche writes are the bytes the kernel reads.
    let mut starved = 0;
    loop {
        let Some(buf) = io.send_buf() else {
            // Every send buffer is queued or in flight: hand them to the
            // kernel and wait until one comes back (bounded, never a spin).
            starved += 1;
            if starved > 64 {
                tracing::debug!("no send buffer came back; the rest goes with the next flush");
                break;
            }
            match io.flush() {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => tracing::debug!(error = %e, "flush failed"),
            }
            if io.writable().await.is_err() {
                break;
            }
            continue;
        };
        let Some(t) = edge.poll_transmit(Instant::now(), buf, max_segments) else {
            break;
        };
        let meta = SendMeta {
            destination: t.to,
            src_ip: local.ip().is_unspecified().then(|| t.from.ip()),
            len: t.len,
            segment_size: (t.len > t.segment_size).then_some(t.segment_size),
        };
        match io.commit_send(&meta) {
            Ok(()) => {
                let segments = t.len.div_ceil(t.segment_size.max(1)).max(1);
                metrics.send_batch.observe(segments as f64);
                crate::telemetry::probes::io_send_batch(segments, t.len, driver);
            }
            Err(e) => tracing::debug!(error = %e, "send failed"),
        }
    }
    // One submission for the whole batch (io_uring: one io_uring_enter;
    // epoll: one sendmmsg per 64 messages). `WouldBlock` means the socket's
    // send buffer is full with sends still queued: wait for POLLOUT (a real
    // wait, never a spin) and go on. Bounded in rounds so that a long drain
    // does not starve receives and timers: whatever is still queued then
    // goes out, in order, with the next loop's flush.
    const FLUSH_WAITS: usize = 64;
    let mut waits = 0;
    loop {
        match io.flush() {
            Ok(()) => break,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && waits < FLUSH_WAITS => {
                waits += 1;
                if io.writable().await.is_err() {
                    break;
                }
            }
            Err(e) => {
                tracing::debug!(error = %e, waits, "flush incomplete; the rest goes with the next one");
                break;
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
    WorkerMetrics::add(&metrics.ring_submits, c.ring_submits - last.ring_submits);
    WorkerMetrics::add(
        &metrics.ring_completions,
        c.ring_completions - last.ring_completions,
    );
    WorkerMetrics::add(
        &metrics.recv_buffers_exhausted,
        c.recv_buffers_exhausted - last.recv_buffers_exhausted,
    );
    WorkerMetrics::add(
        &metrics.recv_truncated,
        c.recv_truncated - last.recv_truncated,
    );
    *last = c;
}
