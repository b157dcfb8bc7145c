//! The HTTP/2 side: per-worker connection pools and the task that carries
//! one request from the edge to a backend and its response back.

pub mod pool;
mod proxy;

use std::net::SocketAddr;
use std::rc::Rc;
use std::time::Duration;

pub use pool::{BackendPool, PoolSettings};
pub use proxy::proxy;

use crate::balancer::{BackendView, PickContext, Policy, RoundRobin};
use crate::config::Config;
use crate::router::RouteTable;

/// Why a request could not be carried to a backend or back. Knows which
/// side failed and maps to the status the client sees.
#[derive(Debug, Clone, thiserror::Error)]
pub enum UpstreamError {
    #[error("no route for host {host} path {path}")]
    NoRoute { host: String, path: String },
    #[error("upstream {upstream} has no backend available")]
    NoBackend { upstream: String },
    #[error("connect to {backend} failed: {error}")]
    Connect { backend: SocketAddr, error: String },
    #[error("connect to {backend} timed out")]
    ConnectTimeout { backend: SocketAddr },
    #[error("no free stream to {backend} before the deadline")]
    PoolTimeout { backend: SocketAddr },
    #[error("backend refused the stream ({0})")]
    Refused(String),
    #[error("backend failed before responding: {0}")]
    BeforeResponse(String),
    #[error("no response within {0:?}")]
    Timeout(Duration),
    #[error("backend reset the response: {0}")]
    ResponseReset(String),
    #[error("response body stalled for {0:?}")]
    Idle(Duration),
    #[error("client went away")]
    Cancelled,
}

impl UpstreamError {
    /// The status sent to the client when no response head was forwarded yet.
    pub fn status(&self) -> u16 {
        match self {
            UpstreamError::NoRoute { .. } => 404,
            UpstreamError::NoBackend { .. } | UpstreamError::PoolTimeout { .. } => 503,
            UpstreamError::Connect { .. }
            | UpstreamError::ConnectTimeout { .. }
            | UpstreamError::Refused(_)
            | UpstreamError::BeforeResponse(_)
            | UpstreamError::ResponseReset(_) => 502,
            UpstreamError::Timeout(_) | UpstreamError::Idle(_) => 504,
            UpstreamError::Cancelled => 499,
        }
    }
}

/// Timeouts of one upstream.
#[derive(Debug, Clone, Copy)]
pub struct UpstreamTimeouts {
    pub connect: Duration,
    /// Until the response head arrives.
    pub request: Duration,
    /// Longest pause in a body, either direction.
    pub idle: Duration,
}

/// One `upstreams:` entry, live on a worker.
pub struct UpstreamGroup {
    pub name: String,
    pub policy: Box<dyn Policy>,
    pub backends: Vec<Rc<BackendPool>>,
    pub timeouts: UpstreamTimeouts,
}

impl UpstreamGroup {
    /// Picks a backend with the group's policy.
    pub fn pick(&self, ctx: &PickContext<'_>) -> Option<Rc<BackendPool>> {
        let views: Vec<BackendView> = self
            .backends
            .iter()
            .map(|b| BackendView {
                address: b.address,
                weight: b.weight,
                available: b.available(),
                in_flight: b.in_flight(),
            })
            .collect();
        self.policy
            .pick(ctx, &views)
            .and_then(|i| self.backends.get(i).cloned())
    }
}

/// Everything a request task needs to find its backend: routes and upstreams.
pub struct Gateway {
    pub routes: RouteTable,
    pub upstreams: Vec<UpstreamGroup>,
}

impl Gateway {
    pub fn new(cfg: &Config) -> Self {
        let upstreams = cfg
            .upstreams
            .iter()
            .map(|u| {
                let settings = PoolSettings {
                    connections: u.pool.connections_per_backend,
                    max_streams: u.pool.max_concurrent_streams,
                    connect_timeout: Duration::from_millis(u.timeouts.connect_ms),
                };
                UpstreamGroup {
                    name: u.name.clone(),
                    // Only round robin is implemented; see `spooky check`.
                    policy: Box::new(RoundRobin::default()),
                    backends: u
                        .backends
                        .iter()
                        .map(|b| BackendPool::new(b.address, b.weight, settings))
                        .collect(),
                    timeouts: UpstreamTimeouts {
                        connect: Duration::from_millis(u.timeouts.connect_ms),
                        request: Duration::from_millis(u.timeouts.request_ms),
                        idle: Duration::from_millis(u.timeouts.idle_ms),
                    },
                }
            })
            .collect();
        Self {
            routes: RouteTable::new(cfg),
            upstreams,
        }
    }

    /// Opens the pools' connections in the background. Call inside a `LocalSet`.
    pub fn warm(&self) {
        for u in &self.upstreams {
            for b in &u.backends {
                b.warm();
            }
        }
    }
}
