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

    pub fn snapshot(&self) -> Vec<BackendSnapshot> {
        self.inner
            .lock()
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default()
    }
}
