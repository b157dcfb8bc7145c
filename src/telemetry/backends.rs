//! The one place per-backend state is published for operators (`GET
//! /backends`): health, ejection, in-flight, EWMA. Workers write snapshots
//! here off the hot path (on state changes and on a timer); the admin
//! thread reads them.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Mutex;

/// Health as the active checker and the outlier detector see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum HealthState {
    /// No check result yet (counts as healthy).
    Unknown,
    Healthy,
    Unhealthy,
}

/// One backend of one upstream, as one worker sees it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct BackendSnapshot {
    pub upstream: String,
    pub address: SocketAddr,
    pub weight: u32,
    pub health: HealthState,
    /// Milliseconds until an outlier ejection ends; 0 when not ejected.
    pub ejected_for_ms: u64,
    pub ejections: u64,
    pub consecutive_failures: u32,
    pub in_flight: u32,
    /// Peak-EWMA response latency in milliseconds (0 when unused).
    pub ewma_ms: f64,
    pub worker: usize,
}

/// Latest snapshot per (upstream, backend, worker).
#[derive(Debug, Default)]
pub struct BackendBoard {
    inner: Mutex<BTreeMap<(String, SocketAddr, usize), BackendSnapshot>>,
}

impl BackendBoard {
    pub fn update(&self, s: BackendSnapshot) {
        if let Ok(mut m) = self.inner.lock() {
            m.insert((s.upstream.clone(), s.address, s.worker), s);
        }
    }

    /// Forgets backends no longer configured (after a reload).
    pub fn retain(&self, keep: impl Fn(&str, &SocketAddr) -> bool) {
        if let Ok(mut m) = self.inner.lock() {
            m.retain(|(u, a, _), _| keep(u, a));
        }
    }

    /// One entry per (upstream, backend), the workers' views inside:
    /// what `GET /backends` serves.
    pub fn aggregated(&self) -> Vec<BackendSummary> {
        let mut out: Vec<BackendSummary> = Vec::new();
        for s in self.snapshot() {
            match out.last_mut() {
                Some(last) if last.upstream == s.upstream && last.address == s.address => {
                    last.add(s)
                }
                _ => out.push(BackendSummary::new(s)),
            }
        }
        out
    }

    pub fn snapshot(&self) -> Vec<BackendSnapshot> {
        self.inner
            .lock()
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default()
    }
}

/// One backend across all workers (`GET /backends`): the overall state, the
/// sums, and each worker's own snapshot under `workers`.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct BackendSummary {
    pub upstream: String,
    pub address: SocketAddr,
    pub weight: u32,
    /// Unhealthy if any worker's checks say so, healthy if any says healthy
    /// and none unhealthy, unknown otherwise.
    pub health: HealthState,
    /// Workers currently ejecting it (passive outlier detection).
    pub ejected_on_workers: usize,
    pub ejections: u64,
    pub in_flight: u32,
    /// Highest EWMA latency any worker measured (ms).
    pub ewma_ms: f64,
    pub workers: Vec<BackendSnapshot>,
}

impl BackendSummary {
    fn new(s: BackendSnapshot) -> Self {
        let mut b = Self {
            upstream: s.upstream.clone(),
            address: s.address,
            weight: s.weight,
            health: HealthState::Unknown,
            ejected_on_workers: 0,
            ejections: 0,
            in_flight: 0,
            ewma_ms: 0.0,
            workers: Vec::new(),
        };
        b.add(s);
        b
    }

    fn add(&mut self, s: BackendSnapshot) {
        self.health = match (self.health, s.health) {
            (HealthState::Unhealthy, _) | (_, HealthState::Unhealthy) => HealthState::Unhealthy,
            (HealthState::Healthy, _) | (_, HealthState::Healthy) => HealthState::Healthy,
            _ => HealthState::Unknown,
        };
        self.ejected_on_workers += usize::from(s.ejected_for_ms > 0);
        self.ejections += s.ejections;
        self.in_flight = self.in_flight.saturating_add(s.in_flight);
        self.ewma_ms = self.ewma_ms.max(s.ewma_ms);
        self.workers.push(s);
    }

    /// 1 while every worker may send to it (not unhealthy, not ejected).
    pub fn up(&self) -> bool {
        self.health != HealthState::Unhealthy && self.ejected_on_workers == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(
        worker: usize,
        addr: &str,
        health: HealthState,
        ejected_for_ms: u64,
    ) -> BackendSnapshot {
        BackendSnapshot {
            upstream: "app".into(),
            address: addr
                .parse()
                .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 1))),
            weight: 1,
            health,
            ejected_for_ms,
            ejections: u64::from(ejected_for_ms > 0),
            consecutive_failures: 0,
            in_flight: 2,
            ewma_ms: worker as f64,
            worker,
        }
    }

    #[test]
    fn one_entry_per_backend_with_workers_inside() {
        let board = BackendBoard::default();
        board.update(snap(0, "127.0.0.1:9001", HealthState::Healthy, 0));
        board.update(snap(1, "127.0.0.1:9001", HealthState::Healthy, 500));
        board.update(snap(0, "127.0.0.1:9002", HealthState::Unknown, 0));
        board.update(snap(1, "127.0.0.1:9002", HealthState::Unhealthy, 0));
        let all = board.aggregated();
        assert_eq!(all.len(), 2);
        let a = &all[0];
        assert_eq!((a.workers.len(), a.in_flight, a.ejections), (2, 4, 1));
        assert_eq!(
            (a.health, a.ejected_on_workers, a.up()),
            (HealthState::Healthy, 1, false)
        );
        assert_eq!(a.ewma_ms, 1.0);
        let b = &all[1];
        assert_eq!((b.health, b.up()), (HealthState::Unhealthy, false));
    }
}
