//! The HTTP/2 side: per-worker connection pools and the task that carries
//! one request from the edge to a backend and its response back.

pub mod driver;
pub mod error;
pub mod health;
pub mod pool;
mod proxy;
pub mod registry;
pub mod transport;

use std::cell::Cell;
use std::rc::Rc;
use std::time::{Duration, Instant};

pub use error::{Cause, ErrorSide, UpstreamError};
pub use pool::{BackendPool, PoolSettings};
pub use proxy::proxy;
pub use registry::Registry;
pub use transport::{Connector, UpstreamStream};

use crate::balancer::{BackendView, PickContext, Policy};
use crate::config::{Config, OnAllUnhealthy};
use crate::router::RouteTable;
use crate::telemetry::WorkerMetrics;

/// Timeouts of one upstream.
#[derive(Debug, Clone, Copy)]
pub struct UpstreamTimeouts {
    pub connect: Duration,
    /// Until the response head arrives.
    pub request: Duration,
    /// Longest pause in a body, either direction.
    pub idle: Duration,
}

/// Retry budget: each request earns `percent`/100 of a retry, each retry
/// spends one, with a small floor so a quiet upstream can still retry. This
/// caps retries at about `percent`% of traffic, so retries cannot amplify
/// an outage.
#[derive(Debug)]
pub struct RetryBudget {
    tokens: Cell<f64>,
    percent: f64,
}

impl RetryBudget {
    const FLOOR: f64 = 3.0;
    const CAP: f64 = 100.0;

    pub fn new(percent: u8) -> Self {
        Self {
            tokens: Cell::new(Self::FLOOR),
            percent: f64::from(percent) / 100.0,
        }
    }

    pub fn on_request(&self) {
        self.tokens
            .set((self.tokens.get() + self.percent).min(Self::CAP.max(Self::FLOOR)));
    }

    /// Takes one retry's worth; false when the budget is spent.
    pub fn try_spend(&self) -> bool {
        if self.tokens.get() >= 1.0 {
            self.tokens.set(self.tokens.get() - 1.0);
            true
        } else {
            false
        }
    }
}

/// How a request to a backend ended, for outlier detection and the policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A response head below 500.
    Success,
    /// 5xx, connect failure, reset before the head.
    Failure,
}

/// One `upstreams:` entry, live on a worker.
///
/// The policy, budget, pending queue and backends are shared with the
/// worker's [`Registry`], so they outlive the generation.
pub struct UpstreamGroup {
    pub name: String,
    pub policy: Rc<dyn Policy>,
    pub backends: Vec<Rc<BackendPool>>,
    pub timeouts: UpstreamTimeouts,
    pub cfg: crate::config::Upstream,
    pub budget: Rc<RetryBudget>,
    /// Requests waiting for a backend below its in-flight cap.
    pub pending: Rc<Cell<u32>>,
    /// Woken when a request to any backend of the group finishes.
    pub slot_freed: Rc<tokio::sync::Notify>,
}

/// Why no backend could be picked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PickError {
    /// Every backend is unhealthy or ejected (and `on_all_unhealthy: fail`).
    NoHealthy,
    /// Healthy backends exist but all are at `max_in_flight_per_backend`.
    AtCapacity,
}

impl UpstreamGroup {
    /// Picks a backend with the group's policy, skipping unhealthy, ejected,
    /// saturated and `exclude`d backends (the latter only while another
    /// choice exists). Returns the backend's index.
    pub fn pick(&self, ctx: &PickContext<'_>, exclude: &[usize]) -> Result<usize, PickError> {
        let now = Instant::now();
        let mut views: Vec<BackendView> = self
            .backends
            .iter()
            .map(|b| BackendView {
                address: b.address,
                weight: b.weight,
                available: b.available(now),
                in_flight: b.in_flight(),
            })
            .collect();
        if !exclude.is_empty() {
            let mut without = views.clone();
            for &i in exclude {
                if let Some(v) = without.get_mut(i) {
                    v.available = false;
                }
            }
            if without.iter().any(|v| v.available) {
                views = without;
            }
        }
        if let Some(i) = self.policy.pick(ctx, &views) {
            return Ok(i);
        }
        // Nothing available: saturated, or sick?
        let healthy: Vec<bool> = self
            .backends
            .iter()
            .map(|b| b.health().healthy() && !b.health().is_ejected(now) && b.connectable())
            .collect();
        if healthy.iter().any(|h| *h) {
            return Err(PickError::AtCapacity);
        }
        if self.cfg.on_all_unhealthy == OnAllUnhealthy::UseAll {
            // Panic mode: balance over every backend below its cap.
            for (v, b) in views.iter_mut().zip(&self.backends) {
                v.available = !b.at_capacity();
            }
            if let Some(i) = self.policy.pick(ctx, &views) {
                return Ok(i);
            }
            return Err(PickError::AtCapacity);
        }
        Err(PickError::NoHealthy)
    }

    /// Feeds a request's outcome to outlier detection and the policy.
    pub fn record(&self, idx: usize, outcome: Outcome, latency: Duration, metrics: &WorkerMetrics) {
        let Some(b) = self.backends.get(idx) else {
            return;
        };
        self.policy
            .observe(idx, latency, outcome == Outcome::Success);
        let streak = b.health().record(outcome == Outcome::Success);
        let o = &self.cfg.outlier;
        if outcome == Outcome::Failure && streak >= o.consecutive_failures {
            let now = Instant::now();
            let ejected = self
                .backends
                .iter()
                .filter(|x| x.health().is_ejected(now))
                .count();
            let n = self.backends.len();
            // Never eject beyond max_ejection_percent of the pool.
            if (ejected + 1) * 100 <= usize::from(o.max_ejection_percent) * n {
                let d = b
                    .health()
                    .eject(now, Duration::from_millis(o.base_ejection_ms));
                WorkerMetrics::inc(&metrics.ejections);
                metrics
                    .obs
                    .ejected(&self.name, b.address, self.cfg.policy, d);
                tracing::warn!(
                    upstream = %self.name,
                    backend = %b.address,
                    failures = streak,
                    ejected_for_ms = d.as_millis() as u64,
                    "backend ejected"
                );
            }
        }
    }
}

/// Everything a request task needs to find its backend: routes and upstreams.
pub struct Gateway {
    pub routes: RouteTable,
    pub upstreams: Vec<UpstreamGroup>,
    pub max_body_buffer_bytes: usize,
}

impl Gateway {
    /// A gateway for `cfg` with nothing carried over from an earlier
    /// generation (the worker keeps a [`Registry`] instead, so reloads keep
    /// backend state).
    pub fn new(cfg: &Config, connector: &Connector) -> Self {
        Registry::default().gateway(cfg, connector)
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
