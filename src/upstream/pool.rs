//! HTTP/2 connection pool for one backend (per worker).
//!
//! `connections_per_backend` h2c connections are opened in the background and
//! shared by requests: each request takes the connection with the fewest
//! streams in flight below `max_concurrent_streams` (and h2 itself enforces
//! the backend's SETTINGS_MAX_CONCURRENT_STREAMS in `ready()`). A connection
//! that closes or receives GOAWAY empties its slot and is reopened on demand;
//! failed connects back off exponentially, during which the backend is
//! reported unavailable to the balancer.

use std::cell::{Cell, RefCell};
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use h2::client::SendRequest;
use tokio::sync::Notify;

use super::transport::{Connector, UpstreamStream};
use super::UpstreamError;

/// Pool tuning from the upstream's config.
#[derive(Debug, Clone, Copy)]
pub struct PoolSettings {
    pub connections: usize,
    pub max_streams: u32,
    pub connect_timeout: Duration,
    /// Circuit breaking: requests in flight to this backend at most.
    pub max_in_flight: u32,
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

enum Slot {
    Empty,
    Connecting,
    Ready {
        sr: SendRequest<Bytes>,
        generation: u64,
        in_flight: Rc<Cell<u32>>,
    },
}

/// Keeps a stream count on its connection while a request uses it.
#[derive(Debug)]
pub struct StreamGuard {
    in_flight: Rc<Cell<u32>>,
    pool: Rc<BackendPool>,
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.in_flight.set(self.in_flight.get().saturating_sub(1));
        self.pool.notify.notify_waiters();
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
        self.pool
            .in_flight
            .set(self.pool.in_flight.get().saturating_sub(1));
    }
}

/// One backend's connections.
pub struct BackendPool {
    pub address: SocketAddr,
    pub weight: u32,
    /// Active check and outlier state; read by every pick.
    pub health: super::health::BackendHealth,
    settings: PoolSettings,
    slots: RefCell<Vec<Slot>>,
    generation: Cell<u64>,
    failures: Cell<u32>,
    backoff_until: Cell<Option<Instant>>,
    last_error: RefCell<Option<String>>,
    in_flight: Cell<u32>,
    notify: Notify,
    /// tokio or io_uring TCP, per worker.
    connector: Connector,
}

impl std::fmt::Debug for BackendPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackendPool")
            .field("address", &self.address)
            .field("in_flight", &self.in_flight.get())
            .finish()
    }
}

impl BackendPool {
    pub fn new(
        address: SocketAddr,
        weight: u32,
        settings: PoolSettings,
        connector: Connector,
    ) -> Rc<Self> {
        let n = settings.connections.max(1);
        Rc::new(Self {
            address,
            weight,
            health: Default::default(),
            settings,
            slots: RefCell::new((0..n).map(|_| Slot::Empty).collect()),
            generation: Cell::new(0),
            failures: Cell::new(0),
            backoff_until: Cell::new(None),
            last_error: RefCell::new(None),
            in_flight: Cell::new(0),
            notify: Notify::new(),
            connector,
        })
    }

    /// How this pool (and its health checker) opens connections.
    pub fn connector(&self) -> &Connector {
        &self.connector
    }

    /// Whether a policy may pick this backend now: healthy, not ejected,
    /// below its in-flight cap, and not in connect backoff.
    pub fn available(&self, now: Instant) -> bool {
        self.health.healthy()
            && !self.health.is_ejected(now)
            && !self.at_capacity()
            && self.connectable()
    }

    /// At `circuit.max_in_flight_per_backend`.
    pub fn at_capacity(&self) -> bool {
        self.in_flight.get() >= self.settings.max_in_flight
    }

    /// False while connects to this backend are failing and backing off.
    pub fn connectable(&self) -> bool {
        match self.backoff_until.get() {
            Some(t) => Instant::now() >= t,
            None => true,
        }
    }

    pub fn in_flight(&self) -> u32 {
        self.in_flight.get()
    }

    /// Counts one request against this backend until the guard drops.
    pub fn reserve(self: &Rc<Self>) -> InFlightGuard {
        self.in_flight.set(self.in_flight.get() + 1);
        InFlightGuard { pool: self.clone() }
    }

    /// Opens every empty slot in the background (warm pool).
    pub fn warm(self: &Rc<Self>) {
        let n = self.slots.borrow().len();
        for i in 0..n {
            self.start_connect(i);
        }
    }

    fn start_connect(self: &Rc<Self>, idx: usize) {
        {
            let mut slots = self.slots.borrow_mut();
            match slots.get(idx) {
                Some(Slot::Empty) => slots[idx] = Slot::Connecting,
                _ => return,
            }
        }
        let pool = self.clone();
        tokio::task::spawn_local(async move {
            let res = pool.connect().await;
            match res {
                Ok((sr, conn)) => {
                    let generation = pool.generation.get() + 1;
                    pool.generation.set(generation);
                    pool.failures.set(0);
                    pool.backoff_until.set(None);
                    if let Some(s) = pool.slots.borrow_mut().get_mut(idx) {
                        *s = Slot::Ready {
                            sr,
                            generation,
                            in_flight: Rc::new(Cell::new(0)),
                        };
                    }
                    pool.notify.notify_waiters();
                    let address = pool.address;
                    tracing::debug!(backend = %address, slot = idx, "h2 connection up");
                    // Hold the pool weakly while driving the connection: the
                    // pool's slot holds the connection's `SendRequest`, and h2
                    // only ends the connection once every `SendRequest` is
                    // gone. A strong reference here would keep a pool
                    // dropped by a config reload, and its connections, alive
                    // forever.
                    let weak = Rc::downgrade(&pool);
                    drop(pool);
                    // Drive the connection until it closes (GOAWAY, error,
                    // EOF, or the pool and every request on it are gone).
                    if let Err(e) = conn.await {
                        tracing::debug!(backend = %address, error = %e, "h2 connection ended");
                    }
                    if let Some(pool) = weak.upgrade() {
                        pool.clear_slot(idx, generation);
                    }
                }
                Err(e) => {
                    let failures = pool.failures.get() + 1;
                    pool.failures.set(failures);
                    let backoff = BACKOFF_MIN
                        .saturating_mul(1u32 << (failures - 1).min(8))
                        .min(BACKOFF_MAX);
                    pool.backoff_until.set(Some(Instant::now() + backoff));
                    if failures == 1 || failures.is_power_of_two() {
                        tracing::warn!(backend = %pool.address, error = %e, failures, "backend connect failed");
                    }
                    *pool.last_error.borrow_mut() = Some(e.to_string());
                    if let Some(s) = pool.slots.borrow_mut().get_mut(idx) {
                        *s = Slot::Empty;
                    }
                    pool.notify.notify_waiters();
                }
            }
        });
    }

    fn clear_slot(&self, idx: usize, generation: u64) {
        let mut slots = self.slots.borrow_mut();
        if let Some(s) = slots.get_mut(idx) {
            if matches!(s, Slot::Ready { generation: g, .. } if *g == generation) {
                *s = Slot::Empty;
            }
        }
        drop(slots);
        self.notify.notify_waiters();
    }

    async fn connect(
        &self,
    ) -> Result<
        (
            SendRequest<Bytes>,
            h2::client::Connection<UpstreamStream, Bytes>,
        ),
        UpstreamError,
    > {
        let addr = self.address;
        let tcp = tokio::time::timeout(self.settings.connect_timeout, self.connector.connect(addr))
            .await
            .map_err(|_| UpstreamError::ConnectTimeout { backend: addr })?
            .map_err(|e| UpstreamError::Connect {
                backend: addr,
                error: e.to_string(),
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
                error: format!("h2 handshake: {e}"),
            })?;
        Ok((sr, conn))
    }

    /// Gets a connection with a free stream, opening one if needed, before `deadline`.
    pub async fn acquire(
        self: &Rc<Self>,
        deadline: Instant,
    ) -> Result<(SendRequest<Bytes>, StreamGuard), UpstreamError> {
        let mut stale_retries = 0;
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();

            // Pick the ready connection with the fewest streams below the cap.
            let mut best: Option<(usize, u32)> = None;
            let mut connecting = false;
            let mut empty = None;
            for (i, s) in self.slots.borrow().iter().enumerate() {
                match s {
                    Slot::Ready { in_flight, .. } => {
                        let n = in_flight.get();
                        if n < self.settings.max_streams && best.is_none_or(|(_, b)| n < b) {
                            best = Some((i, n));
                        }
                    }
                    Slot::Connecting => connecting = true,
                    Slot::Empty => {
                        if empty.is_none() {
                            empty = Some(i);
                        }
                    }
                }
            }
            // Keep the pool at full size in the background.
            if let Some(i) = empty {
                if self.connectable() {
                    self.start_connect(i);
                    connecting = true;
                }
            }
            if let Some((i, _)) = best {
                let (sr, generation, in_flight) = match &self.slots.borrow()[i] {
                    Slot::Ready {
                        sr,
                        generation,
                        in_flight,
                    } => (sr.clone(), *generation, in_flight.clone()),
                    _ => continue,
                };
                in_flight.set(in_flight.get() + 1);
                let guard = StreamGuard {
                    in_flight,
                    pool: self.clone(),
                };
                match tokio::time::timeout_at(deadline.into(), sr.ready()).await {
                    Ok(Ok(sr)) => return Ok((sr, guard)),
                    Ok(Err(e)) => {
                        // GOAWAY or a dead connection: nothing was sent, so
                        // trying another connection is safe for any method.
                        drop(guard);
                        self.clear_slot(i, generation);
                        stale_retries += 1;
                        if stale_retries > 3 {
                            return Err(UpstreamError::Connect {
                                backend: self.address,
                                error: format!("h2 connection unusable: {e}"),
                            });
                        }
                        continue;
                    }
                    Err(_) => {
                        return Err(UpstreamError::PoolTimeout {
                            backend: self.address,
                        })
                    }
                }
            }
            if !connecting {
                let err = self
                    .last_error
                    .borrow()
                    .clone()
                    .unwrap_or_else(|| "no connection".into());
                return Err(UpstreamError::Connect {
                    backend: self.address,
                    error: err,
                });
            }
            if tokio::time::timeout_at(deadline.into(), notified)
                .await
                .is_err()
            {
                return Err(UpstreamError::ConnectTimeout {
                    backend: self.address,
                });
            }
        }
    }
}

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
