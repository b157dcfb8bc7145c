//! HTTP/2 connection pool for one backend (per worker).
//!
//! `connections_per_backend` h2c connections are opened in the background
//! (the warm minimum) and shared by requests: each request takes the first
//! connection (in slot order) with a stream free below its stream cap,
//! `min(max_concurrent_streams, the backend's SETTINGS_MAX_CONCURRENT_STREAMS)`.
//! Packing streams onto the fewest connections, rather than spreading them,
//! lets one write to the backend carry the HEADERS of many requests: at
//! 4 × 16 client streams over 2 × 32 warm connections it measured 1.4×
//! the requests per CPU-second of least-loaded (docs/perf.md). The
//! connections it leaves unused go idle and close (`timeouts.idle_ms`).
//! A new connection is used only after a PING round trip, so the backend's
//! SETTINGS are known before the first stream goes out on it. When every
//! connection is at its cap the request waits (at most `circuit.max_pending`
//! waiters, until the request's deadline) and, when the connections being
//! opened cannot take the waiters, the pool opens another one, up to
//! `max_connections_per_backend`. A pool that is merely busy never fails a
//! request as a connect failure: only a full queue (`PoolFull`) or a passed
//! deadline (`PoolTimeout`) ends the wait, both 503 with `retry-after`.
//!
//! A connection that receives GOAWAY (or dies) leaves its slot at once and
//! drains: its streams run to their end on the old h2 connection while the
//! slot opens a new one. A connection unused for `timeouts.idle_ms` closes
//! while the pool has more than its warm minimum. Failed connects back off
//! exponentially, during which the backend is reported unavailable to the
//! balancer.
//!
//! The choice among use / open / wait / fail is [`decide`], a pure function
//! of a snapshot of the pool.

use std::cell::{Cell, RefCell};
use std::net::SocketAddr;
use std::rc::{Rc, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use h2::client::SendRequest;
use tokio::sync::Notify;

use super::transport::{Connector, UpstreamStream};
use super::{Cause, UpstreamError};

/// Pool tuning from the upstream's config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolSettings {
    /// Warm minimum (`pool.connections_per_backend`).
    pub connections: usize,
    /// Growth limit (`pool.max_connections_per_backend`).
    pub max_connections: usize,
    pub max_streams: u32,
    pub connect_timeout: Duration,
    /// An idle connection above the warm minimum closes after this long.
    pub idle_timeout: Duration,
    /// Circuit breaking: requests in flight to this backend at most.
    pub max_in_flight: u32,
    /// Requests that may wait for a stream at once (`circuit.max_pending`).
    pub max_waiting: u32,
}

const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// h2 stream receive window. What a backend may send on one stream beyond
/// what spooky has handed to the edge, so it is also what a stream whose
/// client stopped reading pins on the h2 side (HAProxy's default is the
/// same 64 KiB). Bulk throughput needs only this much in flight between the
/// backend and spooky; the edge's grant (`limits.*_body_buffer_bytes`)
/// absorbs the client side.
const STREAM_WINDOW: u32 = 64 * 1024;
/// Floor of the h2 connection receive window.
const CONN_WINDOW: u32 = 4 * 1024 * 1024;

/// Connection window for a pool allowing `max_streams` streams per
/// connection: room for every stream's full window, so streams stalled by
/// their clients can never close the connection window on the others.
fn conn_window(max_streams: u32) -> u32 {
    const H2_MAX_WINDOW: u32 = (1 << 31) - 1;
    STREAM_WINDOW
        .saturating_mul(max_streams)
        .clamp(CONN_WINDOW, H2_MAX_WINDOW)
}

/// A waiting request re-checks the pool at least this often: the safety net
/// for a wake-up handed to a waiter that left before using it.
const WAIT_RECHECK: Duration = Duration::from_millis(100);
/// Connections found dead (GOAWAY, reset) one request tries before it gives
/// up; each is left to drain and replaced.
const MAX_STALE: u32 = 3;

/// One live h2 connection and the pool's streams on it.
struct Conn {
    sr: SendRequest<Bytes>,
    generation: u64,
    in_flight: Cell<u32>,
    /// When `in_flight` last fell to zero (or the connection came up).
    idle_since: Cell<Instant>,
}

impl Conn {
    /// Streams this connection may carry: the configured cap, lowered to
    /// what the backend announced (SETTINGS_MAX_CONCURRENT_STREAMS; h2
    /// reports "unlimited" until the backend's SETTINGS arrive).
    fn cap(&self, configured: u32) -> u32 {
        let announced = u32::try_from(self.sr.current_max_send_streams()).unwrap_or(u32::MAX);
        configured.min(announced)
    }
}

enum Slot {
    Empty,
    Connecting,
    Ready(Rc<Conn>),
}

/// A pool slot as [`decide`] sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotState {
    Empty,
    Connecting,
    Ready { in_flight: u32, cap: u32 },
}

/// What [`decide`] needs besides the slots.
#[derive(Debug, Clone, Copy)]
pub struct PoolView {
    /// Not in connect backoff.
    pub connectable: bool,
    /// Requests waiting for a stream, the deciding one excluded.
    pub waiting: u32,
    /// `circuit.max_pending`.
    pub max_waiting: u32,
    /// The deciding request already waits (holds a place in the queue).
    pub is_waiter: bool,
    /// Streams a connection still being opened is expected to take (the
    /// configured cap; the backend's own limit is not known yet).
    pub stream_cap: u32,
}

/// What a request in [`BackendPool::acquire`] does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Take a stream on the connection in this slot.
    Use(usize),
    /// Open a connection in this empty slot, then wait.
    Open(usize),
    /// Wait for a stream to free up or a connection to come up.
    Wait,
    /// Nothing is up or being opened and connects are failing: the one case
    /// that is a connect failure.
    Unreachable,
    /// The waiting queue is at `max_waiting`: shed (503).
    QueueFull,
}

/// The pool's use / open / wait / fail decision, from a snapshot.
///
/// The first ready connection with room is used (packing; see the module
/// docs). Waiters go first: a newcomer takes a free stream only when nobody waits
/// (or the queue is full, where taking it beats refusing). A connection is
/// opened only when the requests that need a stream, this one included,
/// exceed what the connections already being opened will take, so a burst
/// opens connections in proportion to its size, not one per request.
pub fn decide(slots: impl IntoIterator<Item = SlotState>, v: &PoolView) -> Step {
    let queue_full = !v.is_waiter && v.waiting >= v.max_waiting;
    let may_take = v.is_waiter || v.waiting == 0 || queue_full;
    let mut ready = 0u32;
    let mut connecting = 0u32;
    let mut empty = None;
    for (i, s) in slots.into_iter().enumerate() {
        match s {
            SlotState::Ready { in_flight, cap } => {
                ready += 1;
                if in_flight < cap && may_take {
                    // First fit: the slots after it need not be looked at
                    // (each look locks that h2 connection's state).
                    return Step::Use(i);
                }
            }
            SlotState::Connecting => connecting += 1,
            SlotState::Empty => {
                empty = empty.or(Some(i));
            }
        }
    }
    if ready == 0 && connecting == 0 && !v.connectable {
        return Step::Unreachable;
    }
    if queue_full {
        return Step::QueueFull;
    }
    let demand = v.waiting.saturating_add(1);
    let coming = connecting.saturating_mul(v.stream_cap);
    match empty {
        Some(e) if v.connectable && demand > coming => Step::Open(e),
        _ => Step::Wait,
    }
}

/// Keeps a stream count on its connection while a request uses it.
pub struct StreamGuard {
    conn: Rc<Conn>,
    pool: Rc<BackendPool>,
}

impl std::fmt::Debug for StreamGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamGuard")
            .field("generation", &self.conn.generation)
            .finish()
    }
}

impl StreamGuard {
    fn new(conn: Rc<Conn>, pool: Rc<BackendPool>) -> Self {
        conn.in_flight.set(conn.in_flight.get() + 1);
        Self { conn, pool }
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        let n = self.conn.in_flight.get().saturating_sub(1);
        self.conn.in_flight.set(n);
        if n == 0 {
            self.conn.idle_since.set(Instant::now());
        }
        // One stream freed: one waiter can use it.
        if self.pool.waiting.get() > 0 {
            self.pool.notify.notify_one();
        }
    }
}

/// Holds a request's place in the pool's waiting queue.
struct WaitGuard(Rc<BackendPool>);

impl WaitGuard {
    fn new(pool: &Rc<BackendPool>) -> Self {
        pool.waiting.set(pool.waiting.get() + 1);
        Self(pool.clone())
    }
}

impl Drop for WaitGuard {
    fn drop(&mut self) {
        self.0.waiting.set(self.0.waiting.get().saturating_sub(1));
    }
}

/// Counts a request against its backend from the moment it is picked (so
/// circuit breaking sees requests still waiting for a connection) until the
/// attempt ends.
#[derive(Debug)]
pub struct InFlightGuard {
    pool: Rc<BackendPool>,
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        let in_flight = &self.pool.state.in_flight;
        in_flight.set(in_flight.get().saturating_sub(1));
    }
}

/// Everything known about one backend, whatever pool serves it: active
/// check and outlier state, connect failures and backoff, requests in
/// flight. Owned by the worker's `Registry`, which keeps it across reloads
/// and shares it with the backend's pool of every generation (a pool built
/// for new limits picks up where the old one was).
#[derive(Debug, Default)]
pub struct BackendState {
    /// Active check and outlier state; read by every pick.
    pub health: super::health::BackendHealth,
    failures: Cell<u32>,
    backoff_until: Cell<Option<Instant>>,
    last_error: RefCell<Option<String>>,
    in_flight: Cell<u32>,
}

/// One backend's connections; what is known about the backend itself is
/// its [`BackendState`].
pub struct BackendPool {
    pub address: SocketAddr,
    pub weight: u32,
    state: Rc<BackendState>,
    settings: PoolSettings,
    /// `max_connections` slots; the first `connections` are kept warm.
    slots: RefCell<Vec<Slot>>,
    generation: Cell<u64>,
    /// Requests in `acquire` waiting for a stream.
    waiting: Cell<u32>,
    notify: Notify,
    /// tokio or io_uring TCP, per worker.
    connector: Connector,
}

impl std::fmt::Debug for BackendPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackendPool")
            .field("address", &self.address)
            .field("in_flight", &self.state.in_flight.get())
            .field("waiting", &self.waiting.get())
            .finish()
    }
}

type Handshake = (
    SendRequest<Bytes>,
    h2::client::Connection<UpstreamStream, Bytes>,
);

impl BackendPool {
    /// A pool for a backend with nothing known about it yet.
    pub fn new(
        address: SocketAddr,
        weight: u32,
        settings: PoolSettings,
        connector: Connector,
    ) -> Rc<Self> {
        Self::with_state(address, weight, settings, connector, Rc::default())
    }

    /// A pool for a backend whose `state` the registry keeps.
    pub fn with_state(
        address: SocketAddr,
        weight: u32,
        settings: PoolSettings,
        connector: Connector,
        state: Rc<BackendState>,
    ) -> Rc<Self> {
        let n = settings.max_connections.max(settings.connections).max(1);
        Rc::new(Self {
            address,
            weight,
            state,
            settings,
            slots: RefCell::new((0..n).map(|_| Slot::Empty).collect()),
            generation: Cell::new(0),
            waiting: Cell::new(0),
            notify: Notify::new(),
            connector,
        })
    }

    /// Active check and outlier state.
    pub fn health(&self) -> &super::health::BackendHealth {
        &self.state.health
    }

    /// What is known about the backend (shared across generations).
    pub fn state(&self) -> &Rc<BackendState> {
        &self.state
    }

    /// The limits this pool was built with.
    pub fn settings(&self) -> PoolSettings {
        self.settings
    }

    /// How this pool (and its health checker) opens connections.
    pub fn connector(&self) -> &Connector {
        &self.connector
    }

    /// Whether a policy may pick this backend now: healthy, not ejected,
    /// below its in-flight cap, and not in connect backoff.
    pub fn available(&self, now: Instant) -> bool {
        self.state.health.healthy()
            && !self.state.health.is_ejected(now)
            && !self.at_capacity()
            && self.connectable()
    }

    /// At `circuit.max_in_flight_per_backend`.
    pub fn at_capacity(&self) -> bool {
        self.state.in_flight.get() >= self.settings.max_in_flight
    }

    /// False while connects to this backend are failing and backing off.
    pub fn connectable(&self) -> bool {
        match self.state.backoff_until.get() {
            Some(t) => Instant::now() >= t,
            None => true,
        }
    }

    pub fn in_flight(&self) -> u32 {
        self.state.in_flight.get()
    }

    /// Connections up or being opened (draining ones excluded).
    pub fn connections(&self) -> usize {
        self.slots
            .borrow()
            .iter()
            .filter(|s| !matches!(s, Slot::Empty))
            .count()
    }

    /// Counts one request against this backend until the guard drops.
    pub fn reserve(self: &Rc<Self>) -> InFlightGuard {
        self.state.in_flight.set(self.state.in_flight.get() + 1);
        InFlightGuard { pool: self.clone() }
    }

    /// Opens the warm minimum in the background.
    pub fn warm(self: &Rc<Self>) {
        self.keep_warm();
    }

    /// Opens empty slots until the warm minimum is up or being opened.
    fn keep_warm(self: &Rc<Self>) {
        let mut live = self.connections();
        while live < self.settings.connections && self.connectable() {
            let empty = self
                .slots
                .borrow()
                .iter()
                .position(|s| matches!(s, Slot::Empty));
            let Some(i) = empty else { return };
            self.start_connect(i);
            live += 1;
        }
    }

    fn start_connect(self: &Rc<Self>, idx: usize) {
        {
            let mut slots = self.slots.borrow_mut();
            match slots.get_mut(idx) {
                Some(s @ Slot::Empty) => *s = Slot::Connecting,
                _ => return,
            }
        }
        let pool = self.clone();
        tokio::task::spawn_local(async move {
            match pool.connect().await {
                Ok((sr, conn)) => run_connection(pool, idx, sr, conn).await,
                Err(e) => pool.connect_failed(idx, &e),
            }
        });
    }

    fn connect_failed(&self, idx: usize, e: &UpstreamError) {
        let failures = self.state.failures.get() + 1;
        self.state.failures.set(failures);
        let backoff = BACKOFF_MIN
            .saturating_mul(1u32 << (failures - 1).min(8))
            .min(BACKOFF_MAX);
        self.state.backoff_until.set(Some(Instant::now() + backoff));
        if failures == 1 || failures.is_power_of_two() {
            tracing::warn!(backend = %self.address, error = %e, failures, "backend connect failed");
        }
        *self.state.last_error.borrow_mut() = Some(e.to_string());
        if let Some(s) = self.slots.borrow_mut().get_mut(idx) {
            *s = Slot::Empty;
        }
        self.notify.notify_waiters();
    }

    /// Puts a connection whose backend SETTINGS are known into its slot.
    fn connected(&self, idx: usize, sr: SendRequest<Bytes>) -> u64 {
        let generation = self.generation.get() + 1;
        self.generation.set(generation);
        self.state.failures.set(0);
        self.state.backoff_until.set(None);
        if let Some(s) = self.slots.borrow_mut().get_mut(idx) {
            *s = Slot::Ready(Rc::new(Conn {
                sr,
                generation,
                in_flight: Cell::new(0),
                idle_since: Cell::new(Instant::now()),
            }));
        }
        // A new connection has room for many streams: wake every waiter.
        self.notify.notify_waiters();
        generation
    }

    /// Empties slot `idx` if it still holds connection `generation`; the
    /// connection itself drains (its streams run on) and ends when they do.
    fn clear_slot(&self, idx: usize, generation: u64) {
        let mut slots = self.slots.borrow_mut();
        if let Some(s) = slots.get_mut(idx) {
            if matches!(s, Slot::Ready(c) if c.generation == generation) {
                *s = Slot::Empty;
            }
        }
        drop(slots);
        self.notify.notify_waiters();
    }

    /// Called when connection `generation` in slot `idx` may have been idle
    /// for `idle_timeout`: closes it (drops the pool's handle, so h2 ends the
    /// connection with GOAWAY) while the pool has more than its warm
    /// minimum. Returns when to check again; `None` once the slot no longer
    /// holds this connection.
    fn retire_if_idle(&self, idx: usize, generation: u64, now: Instant) -> Option<Instant> {
        let idle = self.settings.idle_timeout;
        let live = self.connections();
        let mut slots = self.slots.borrow_mut();
        let slot = slots.get_mut(idx)?;
        let Slot::Ready(c) = &*slot else { return None };
        if c.generation != generation {
            return None;
        }
        if c.in_flight.get() > 0 {
            return Some(now + idle);
        }
        let due = c.idle_since.get() + idle;
        if due > now {
            return Some(due);
        }
        if live <= self.settings.connections {
            return Some(now + idle);
        }
        *slot = Slot::Empty;
        tracing::debug!(backend = %self.address, slot = idx, "idle h2 connection closed");
        None
    }

    async fn connect(&self) -> Result<Handshake, UpstreamError> {
        let addr = self.address;
        let tcp = tokio::time::timeout(self.settings.connect_timeout, self.connector.connect(addr))
            .await
            .map_err(|_| UpstreamError::ConnectTimeout { backend: addr })?
            .map_err(|e| UpstreamError::Connect {
                backend: addr,
                cause: Cause::Io(e),
            })?;
        let handshake = h2::client::Builder::new()
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(conn_window(self.settings.max_streams))
            .max_frame_size(64 * 1024)
            .enable_push(false)
            .handshake::<_, Bytes>(tcp);
        let (sr, conn) = tokio::time::timeout(self.settings.connect_timeout, handshake)
            .await
            .map_err(|_| UpstreamError::ConnectTimeout { backend: addr })?
            .map_err(|e| UpstreamError::Connect {
                backend: addr,
                cause: Cause::H2(e),
            })?;
        Ok((sr, conn))
    }

    /// The slots as [`decide`] sees them, looked at lazily: `decide` stops
    /// at the first connection with room.
    fn decide(&self, is_waiter: bool) -> Step {
        let cap = self.settings.max_streams;
        let slots = self.slots.borrow();
        let states = slots.iter().map(|s| match s {
            Slot::Empty => SlotState::Empty,
            Slot::Connecting => SlotState::Connecting,
            Slot::Ready(c) => SlotState::Ready {
                in_flight: c.in_flight.get(),
                cap: c.cap(cap),
            },
        });
        decide(states, &self.view(is_waiter))
    }

    fn view(&self, is_waiter: bool) -> PoolView {
        PoolView {
            connectable: self.connectable(),
            waiting: self.waiting.get().saturating_sub(u32::from(is_waiter)),
            max_waiting: self.settings.max_waiting,
            is_waiter,
            stream_cap: self.settings.max_streams,
        }
    }

    fn conn_at(&self, idx: usize) -> Option<Rc<Conn>> {
        match self.slots.borrow().get(idx) {
            Some(Slot::Ready(c)) => Some(c.clone()),
            _ => None,
        }
    }

    fn connect_error(&self) -> UpstreamError {
        UpstreamError::Connect {
            backend: self.address,
            cause: Cause::Earlier(
                self.state
                    .last_error
                    .borrow()
                    .clone()
                    .unwrap_or_else(|| "no connection".into()),
            ),
        }
    }

    /// Gets a stream on a connection, waiting for one (or for a connection
    /// the pool opens) until `deadline`. Fails with `PoolFull` when
    /// `max_waiting` requests already wait, `PoolTimeout` at the deadline,
    /// and a connect error only when connects to the backend are failing.
    pub async fn acquire(
        self: &Rc<Self>,
        deadline: Instant,
    ) -> Result<(SendRequest<Bytes>, StreamGuard), UpstreamError> {
        let mut queued: Option<WaitGuard> = None;
        let mut stale = 0;
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            self.keep_warm();
            match self.decide(queued.is_some()) {
                Step::Use(i) => {
                    let Some(conn) = self.conn_at(i) else {
                        continue;
                    };
                    let guard = StreamGuard::new(conn.clone(), self.clone());
                    drop(queued.take());
                    // A fresh clone has no stream pending, so `ready` only
                    // reports whether the connection still takes streams.
                    match conn.sr.clone().ready().await {
                        Ok(sr) => return Ok((sr, guard)),
                        Err(e) => {
                            // GOAWAY or a dead connection: nothing was sent,
                            // so another connection is safe for any method.
                            drop(guard);
                            self.clear_slot(i, conn.generation);
                            stale += 1;
                            if stale > MAX_STALE {
                                return Err(UpstreamError::Connect {
                                    backend: self.address,
                                    cause: Cause::H2(e),
                                });
                            }
                            continue;
                        }
                    }
                }
                Step::Open(i) => self.start_connect(i),
                Step::Wait => {}
                Step::Unreachable => return Err(self.connect_error()),
                Step::QueueFull => {
                    return Err(UpstreamError::PoolFull {
                        backend: self.address,
                    })
                }
            }
            if queued.is_none() {
                queued = Some(WaitGuard::new(self));
            }
            let wake = deadline.min(Instant::now() + WAIT_RECHECK);
            let woken = tokio::time::timeout_at(wake.into(), notified).await.is_ok();
            if !woken && Instant::now() >= deadline {
                return Err(UpstreamError::PoolTimeout {
                    backend: self.address,
                });
            }
        }
    }
}

/// Readies a new connection (learns the backend's SETTINGS), puts it in
/// slot `idx`, then drives it until it ends, closing it when idle.
async fn run_connection(
    pool: Rc<BackendPool>,
    idx: usize,
    sr: SendRequest<Bytes>,
    mut conn: h2::client::Connection<UpstreamStream, Bytes>,
) {
    let address = pool.address;
    let pings = conn.ping_pong();
    tokio::pin!(conn);
    // The backend sends its SETTINGS first, so once our PING is answered
    // its SETTINGS_MAX_CONCURRENT_STREAMS is applied: no stream goes out
    // on this connection above the backend's limit.
    let settled = async {
        if let Some(mut p) = pings {
            if let Err(e) = p.ping(h2::Ping::opaque()).await {
                tracing::debug!(backend = %address, error = %e, "h2 settings ping failed");
            }
        }
    };
    tokio::select! {
        r = &mut conn => {
            let cause = r.err().map_or(Cause::Closed("h2 connection ended during setup"), Cause::H2);
            pool.connect_failed(idx, &UpstreamError::Connect {
                backend: address,
                cause,
            });
            return;
        }
        _ = tokio::time::timeout(pool.settings.connect_timeout, settled) => {}
    }
    let generation = pool.connected(idx, sr);
    tracing::debug!(backend = %address, slot = idx, "h2 connection up");
    let idle = pool.settings.idle_timeout;
    // Hold the pool weakly while driving the connection: the pool's slot
    // holds the connection's `SendRequest`, and h2 only ends the connection
    // once every `SendRequest` is gone. A strong reference here would keep a
    // pool dropped by a config reload, and its connections, alive forever.
    let weak = Rc::downgrade(&pool);
    drop(pool);
    drive(weak, idx, generation, conn, Instant::now() + idle).await;
}

/// Drives a ready connection until it closes (GOAWAY, error, EOF, or the
/// pool and every request on it are gone), checking for idleness at
/// `check_at` and whenever the last check says.
async fn drive(
    weak: Weak<BackendPool>,
    idx: usize,
    generation: u64,
    mut conn: std::pin::Pin<&mut h2::client::Connection<UpstreamStream, Bytes>>,
    first_check: Instant,
) {
    let mut check_at = Some(first_check);
    loop {
        let check = async {
            match check_at {
                Some(t) => tokio::time::sleep_until(t.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            r = &mut conn => {
                if let Err(e) = r {
                    tracing::debug!(slot = idx, error = %e, "h2 connection ended");
                }
                break;
            }
            () = check => {
                check_at = weak
                    .upgrade()
                    .and_then(|p| p.retire_if_idle(idx, generation, Instant::now()));
            }
        }
    }
    if let Some(pool) = weak.upgrade() {
        pool.clear_slot(idx, generation);
    }
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod window_tests {
    use super::*;

    #[test]
    fn connection_window_covers_every_stream_window() {
        assert_eq!(conn_window(1), CONN_WINDOW);
        assert_eq!(conn_window(100), 100 * STREAM_WINDOW);
        assert!(conn_window(1000) >= 1000 * STREAM_WINDOW);
        assert_eq!(conn_window(u32::MAX), (1 << 31) - 1);
    }
}
