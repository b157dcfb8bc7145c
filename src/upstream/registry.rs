//! One home, per worker, for backend state that must outlive a config
//! generation: keyed by (upstream, address), it keeps each backend's pool
//! (health, outlier ejection, connect backoff, in-flight count and its warm
//! h2 connections) and health checker, and keyed by upstream, the policy
//! (EWMA and rotation state), the retry budget and the pending queue.
//!
//! A reload diffs the new backend sets against what the registry holds:
//! - a backend that stays keeps its state and its warm connections (when
//!   its weight or pool settings changed it gets a new pool sharing the
//!   same [`BackendState`](super::pool::BackendState): health, ejection,
//!   connect backoff, requests in flight);
//! - a removed backend leaves the registry: its checker stops, and its pool
//!   drains with the last request of the generation that still uses it;
//! - a new backend starts fresh (health `unknown`, which takes traffic).
//!
//! Without it every reload (even of an unchanged file) forgot which
//! backends were down or ejected and put them straight back into rotation.

use std::cell::Cell;
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use super::pool::{BackendPool, PoolSettings};
use super::transport::Connector;
use super::{Gateway, RetryBudget, UpstreamGroup, UpstreamTimeouts};
use crate::balancer::Policy;
use crate::config::{Config, HealthCheck, Policy as PolicyKind, Upstream};
use crate::router::RouteTable;
use crate::telemetry::backends::BackendBoard;
use crate::telemetry::WorkerMetrics;

/// A backend's identity across generations.
pub type BackendKey = (String, SocketAddr);

/// What the registry keeps of one backend.
struct BackendEntry {
    pool: Rc<BackendPool>,
    /// The checker's settings, to restart it only when they change.
    health_check: HealthCheck,
    checker: Option<tokio::task::JoinHandle<()>>,
}

impl BackendEntry {
    fn stop_checker(&mut self) {
        if let Some(h) = self.checker.take() {
            h.abort();
        }
    }
}

/// What the registry keeps of one upstream.
struct UpstreamEntry {
    policy: Rc<dyn Policy>,
    /// The policy and the (address, weight) list it was built for: a policy
    /// indexes backends by position, so it is kept only while both match.
    policy_for: (PolicyKind, Vec<(SocketAddr, u32)>),
    budget: Rc<RetryBudget>,
    budget_percent: u8,
    pending: Rc<Cell<u32>>,
    slot_freed: Rc<tokio::sync::Notify>,
}

/// The per-worker backend registry (see the module docs).
#[derive(Default)]
pub struct Registry {
    backends: HashMap<BackendKey, BackendEntry>,
    upstreams: HashMap<String, UpstreamEntry>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("backends", &self.backends.len())
            .field("upstreams", &self.upstreams.len())
            .finish()
    }
}

/// The pool limits `u` asks for.
fn pool_settings(u: &Upstream) -> PoolSettings {
    PoolSettings {
        connections: u.pool.connections_per_backend,
        max_connections: u.pool.max_connections_per_backend,
        max_streams: u.pool.max_concurrent_streams,
        connect_timeout: Duration::from_millis(u.timeouts.connect_ms),
        idle_timeout: Duration::from_millis(u.timeouts.idle_ms),
        max_in_flight: u.circuit.max_in_flight_per_backend,
        max_waiting: u.circuit.max_pending,
    }
}

impl Registry {
    /// The gateway for generation `cfg`, reusing what the registry holds
    /// for every backend and upstream that stays, and forgetting those that
    /// are gone. Call [`Registry::start_health_checks`] after it.
    pub fn gateway(&mut self, cfg: &Config, connector: &Connector) -> Gateway {
        let mut seen: HashSet<BackendKey> = HashSet::new();
        let upstreams = cfg
            .upstreams
            .iter()
            .map(|u| self.group(u, connector, &mut seen))
            .collect();
        self.backends.retain(|key, entry| {
            let keep = seen.contains(key);
            if !keep {
                entry.stop_checker();
            }
            keep
        });
        self.upstreams
            .retain(|name, _| cfg.upstreams.iter().any(|u| &u.name == name));
        Gateway {
            routes: RouteTable::new(cfg),
            upstreams,
            max_body_buffer_bytes: cfg.limits.max_body_buffer_bytes,
        }
    }

    fn group(
        &mut self,
        u: &Upstream,
        connector: &Connector,
        seen: &mut HashSet<BackendKey>,
    ) -> UpstreamGroup {
        let settings = pool_settings(u);
        let backends = u
            .backends
            .iter()
            .map(|b| {
                let key = (u.name.clone(), b.address);
                seen.insert(key.clone());
                self.backend(key, b.weight, settings, &u.health_check, connector)
            })
            .collect();
        let list: Vec<(SocketAddr, u32)> =
            u.backends.iter().map(|b| (b.address, b.weight)).collect();
        let entry = self.upstream(u, list);
        UpstreamGroup {
            name: u.name.clone(),
            policy: entry.policy.clone(),
            backends,
            timeouts: UpstreamTimeouts {
                connect: Duration::from_millis(u.timeouts.connect_ms),
                request: Duration::from_millis(u.timeouts.request_ms),
                idle: Duration::from_millis(u.timeouts.idle_ms),
            },
            budget: entry.budget.clone(),
            pending: entry.pending.clone(),
            slot_freed: entry.slot_freed.clone(),
            cfg: u.clone(),
        }
    }

    /// The pool for one backend of the new generation.
    fn backend(
        &mut self,
        key: BackendKey,
        weight: u32,
        settings: PoolSettings,
        health_check: &HealthCheck,
        connector: &Connector,
    ) -> Rc<BackendPool> {
        let address = key.1;
        let entry = self.backends.entry(key).or_insert_with(|| BackendEntry {
            pool: BackendPool::new(address, weight, settings, connector.clone()),
            health_check: health_check.clone(),
            checker: None,
        });
        if entry.pool.weight != weight || entry.pool.settings() != settings {
            // New limits need a new pool; the old one drains with the
            // requests still on it. What is known about the backend
            // (health, ejection, backoff, in flight) is the same object.
            let state = entry.pool.state().clone();
            entry.pool =
                BackendPool::with_state(address, weight, settings, connector.clone(), state);
            entry.stop_checker();
        }
        if &entry.health_check != health_check {
            entry.health_check = health_check.clone();
            entry.stop_checker();
        }
        entry.pool.clone()
    }

    fn upstream(&mut self, u: &Upstream, list: Vec<(SocketAddr, u32)>) -> &UpstreamEntry {
        let policy_for = (u.policy, list);
        let entry = self
            .upstreams
            .entry(u.name.clone())
            .or_insert_with(|| UpstreamEntry {
                policy: Rc::from(crate::balancer::build(policy_for.0, &policy_for.1)),
                policy_for: policy_for.clone(),
                budget: Rc::new(RetryBudget::new(u.retries.budget_percent)),
                budget_percent: u.retries.budget_percent,
                pending: Rc::new(Cell::new(0)),
                slot_freed: Rc::new(tokio::sync::Notify::new()),
            });
        if entry.policy_for != policy_for {
            entry.policy = Rc::from(crate::balancer::build(policy_for.0, &policy_for.1));
            entry.policy_for = policy_for;
        }
        if entry.budget_percent != u.retries.budget_percent {
            entry.budget = Rc::new(RetryBudget::new(u.retries.budget_percent));
            entry.budget_percent = u.retries.budget_percent;
        }
        entry
    }

    /// Starts a health checker for every backend that has none (new ones,
    /// and those whose pool or check settings changed). Call inside a
    /// `LocalSet`.
    pub fn start_health_checks(
        &mut self,
        metrics: &Arc<WorkerMetrics>,
        board: &Arc<BackendBoard>,
        worker: usize,
    ) {
        for ((upstream, _), entry) in self.backends.iter_mut() {
            if entry.checker.is_none() {
                entry.checker = Some(tokio::task::spawn_local(super::health::run_checker(
                    entry.pool.clone(),
                    entry.health_check.clone(),
                    upstream.clone(),
                    metrics.clone(),
                    board.clone(),
                    worker,
                )));
            }
        }
    }

    /// Backends the registry holds.
    pub fn len(&self) -> usize {
        self.backends.len()
    }

    pub fn is_empty(&self) -> bool {
        self.backends.is_empty()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use std::time::Instant;

    use super::*;
    use crate::config::Backend;

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    fn config(ports: &[u16]) -> Config {
        let backends = ports.iter().map(|p| Backend::new(addr(*p))).collect();
        Config::minimal(vec![Upstream::new("app", backends)])
    }

    #[test]
    fn a_backend_that_stays_keeps_its_state_and_a_new_one_starts_fresh() {
        let mut reg = Registry::default();
        let gw = reg.gateway(&config(&[1, 2]), &Connector::Tokio);
        let down = gw.upstreams[0].backends[1].clone();
        down.health().eject(Instant::now(), Duration::from_secs(60));
        gw.upstreams[0].budget.try_spend();
        drop(gw);

        // The same file again: same pools, same state.
        let gw = reg.gateway(&config(&[1, 2]), &Connector::Tokio);
        let again = &gw.upstreams[0].backends[1];
        assert!(
            Rc::ptr_eq(again, &down),
            "the pool (and its connections) stays"
        );
        assert!(again.health().is_ejected(Instant::now()), "still ejected");

        // One removed, one added.
        let gw = reg.gateway(&config(&[2, 3]), &Connector::Tokio);
        assert_eq!(reg.len(), 2);
        assert!(gw.upstreams[0].backends[0]
            .health()
            .is_ejected(Instant::now()));
        let fresh = &gw.upstreams[0].backends[1];
        assert_eq!(fresh.address, addr(3));
        assert!(
            fresh.available(Instant::now()),
            "a new backend takes traffic"
        );
    }

    #[test]
    fn new_pool_settings_keep_what_was_learnt_about_the_backend() {
        let mut reg = Registry::default();
        let gw = reg.gateway(&config(&[1]), &Connector::Tokio);
        let old = gw.upstreams[0].backends[0].clone();
        old.health().eject(Instant::now(), Duration::from_secs(60));
        let mut cfg = config(&[1]);
        cfg.upstreams[0].circuit.max_in_flight_per_backend = 7;
        let gw = reg.gateway(&cfg, &Connector::Tokio);
        let new = &gw.upstreams[0].backends[0];
        assert!(!Rc::ptr_eq(new, &old), "new limits, new pool");
        let _busy = old.reserve();
        assert_eq!(new.in_flight(), 1, "one in-flight count per backend");
        assert!(
            new.health().is_ejected(Instant::now()),
            "ejection carried over"
        );
    }

    #[test]
    fn the_policy_and_the_pending_queue_outlive_a_reload() {
        let mut reg = Registry::default();
        let a = reg.gateway(&config(&[1, 2]), &Connector::Tokio);
        a.upstreams[0].pending.set(3);
        let b = reg.gateway(&config(&[1, 2]), &Connector::Tokio);
        assert!(Rc::ptr_eq(&a.upstreams[0].policy, &b.upstreams[0].policy));
        assert_eq!(
            b.upstreams[0].pending.get(),
            3,
            "one queue across generations"
        );
        let c = reg.gateway(&config(&[1, 2, 3]), &Connector::Tokio);
        assert!(
            !Rc::ptr_eq(&a.upstreams[0].policy, &c.upstreams[0].policy),
            "another backend list needs another policy"
        );
    }
}
