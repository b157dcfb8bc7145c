//! Keeping traffic off sick backends: active HTTP/2 health checks and
//! passive outlier detection, both feeding one per-backend state that every
//! policy sees as `available`.

use std::cell::Cell;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use h2::client::SendRequest;

use super::pool::BackendPool;
use super::transport::Connector;
use crate::config::HealthCheck;
use crate::telemetry::backends::{BackendBoard, BackendSnapshot, HealthState};
use crate::telemetry::WorkerMetrics;

/// Longest ejection, however often a backend is ejected.
pub const MAX_EJECTION: Duration = Duration::from_secs(300);

/// Health and ejection state of one backend (per worker).
#[derive(Debug)]
pub struct BackendHealth {
    state: Cell<HealthState>,
    ok_streak: Cell<u32>,
    fail_streak: Cell<u32>,
    /// Passive: failed requests in a row (5xx, connect failure, reset).
    consecutive_failures: Cell<u32>,
    ejected_until: Cell<Option<Instant>>,
    ejections: Cell<u32>,
}

impl Default for BackendHealth {
    fn default() -> Self {
        Self {
            state: Cell::new(HealthState::Unknown),
            ok_streak: Cell::new(0),
            fail_streak: Cell::new(0),
            consecutive_failures: Cell::new(0),
            ejected_until: Cell::new(None),
            ejections: Cell::new(0),
        }
    }
}

impl BackendHealth {
    pub fn state(&self) -> HealthState {
        self.state.get()
    }

    /// Unknown counts as healthy so traffic flows before the first check.
    pub fn healthy(&self) -> bool {
        self.state.get() != HealthState::Unhealthy
    }

    pub fn is_ejected(&self, now: Instant) -> bool {
        self.ejected_until.get().is_some_and(|t| now < t)
    }

    pub fn ejected_for(&self, now: Instant) -> Duration {
        self.ejected_until
            .get()
            .map(|t| t.saturating_duration_since(now))
            .unwrap_or_default()
    }

    pub fn ejections(&self) -> u32 {
        self.ejections.get()
    }

    pub fn consecutive_failures(&self) -> u32 {
        self.consecutive_failures.get()
    }

    /// Applies one active check result; returns the new state on a transition.
    pub fn check_result(&self, ok: bool, cfg: &HealthCheck) -> Option<HealthState> {
        if ok {
            self.fail_streak.set(0);
            self.ok_streak.set(self.ok_streak.get().saturating_add(1));
            if self.state.get() != HealthState::Healthy
                && self.ok_streak.get() >= cfg.healthy_threshold
            {
                self.state.set(HealthState::Healthy);
                return Some(HealthState::Healthy);
            }
        } else {
            self.ok_streak.set(0);
            self.fail_streak
                .set(self.fail_streak.get().saturating_add(1));
            if self.state.get() != HealthState::Unhealthy
                && self.fail_streak.get() >= cfg.unhealthy_threshold
            {
                self.state.set(HealthState::Unhealthy);
                return Some(HealthState::Unhealthy);
            }
        }
        None
    }

    /// Records a request outcome; returns the failure streak.
    pub fn record(&self, ok: bool) -> u32 {
        if ok {
            self.consecutive_failures.set(0);
        } else {
            self.consecutive_failures
                .set(self.consecutive_failures.get().saturating_add(1));
        }
        self.consecutive_failures.get()
    }

    /// Ejects for `base × 2^n` (n = earlier ejections), capped at [`MAX_EJECTION`].
    pub fn eject(&self, now: Instant, base: Duration) -> Duration {
        let n = self.ejections.get().min(16);
        let d = base.saturating_mul(1u32 << n).min(MAX_EJECTION);
        self.ejections.set(self.ejections.get().saturating_add(1));
        self.ejected_until.set(Some(now + d));
        self.consecutive_failures.set(0);
        d
    }
}

/// Publishes one backend's state to the board behind `GET /backends`.
pub fn publish(
    board: &BackendBoard,
    upstream: &str,
    pool: &BackendPool,
    ewma_ms: f64,
    worker: usize,
) {
    let now = Instant::now();
    board.update(BackendSnapshot {
        upstream: upstream.to_string(),
        address: pool.address,
        weight: pool.weight,
        health: pool.health().state(),
        ejected_for_ms: pool.health().ejected_for(now).as_millis() as u64,
        ejections: pool.health().ejections() as u64,
        consecutive_failures: pool.health().consecutive_failures(),
        in_flight: pool.in_flight(),
        ewma_ms,
        worker,
    });
}

/// Probes one backend forever: `GET path` on a dedicated h2c connection
/// every `interval_ms`, a success being a 2xx within `timeout_ms`.
pub async fn run_checker(
    pool: Rc<BackendPool>,
    cfg: HealthCheck,
    upstream: String,
    metrics: Arc<WorkerMetrics>,
    board: Arc<BackendBoard>,
    worker: usize,
) {
    let interval = Duration::from_millis(cfg.interval_ms.max(1));
    let timeout = Duration::from_millis(cfg.timeout_ms.max(1));
    let mut conn: Option<SendRequest<Bytes>> = None;
    loop {
        let ok = match tokio::time::timeout(
            timeout,
            probe(pool.connector(), pool.address, &cfg.path, &mut conn),
        )
        .await
        {
            Ok(Ok(())) => true,
            Ok(Err(e)) => {
                tracing::debug!(backend = %pool.address, error = %e, "health check failed");
                false
            }
            Err(_) => {
                conn = None;
                tracing::debug!(backend = %pool.address, "health check timed out");
                false
            }
        };
        if let Some(state) = pool.health().check_result(ok, &cfg) {
            WorkerMetrics::inc(&metrics.health_transitions);
            crate::telemetry::probes::backend_state(
                &upstream,
                &pool.address,
                state.into(),
                Duration::ZERO,
            );
            match state {
                HealthState::Unhealthy => {
                    tracing::warn!(%upstream, backend = %pool.address, "backend unhealthy")
                }
                _ => tracing::info!(%upstream, backend = %pool.address, "backend healthy"),
            }
        }
        publish(&board, &upstream, &pool, 0.0, worker);
        tokio::time::sleep(interval).await;
    }
}

async fn probe(
    connector: &Connector,
    addr: SocketAddr,
    path: &str,
    conn: &mut Option<SendRequest<Bytes>>,
) -> Result<(), String> {
    let sr = match conn.take() {
        Some(sr) => sr,
        None => {
            let tcp = connector.connect(addr).await.map_err(|e| e.to_string())?;
            let (sr, c) = h2::client::handshake(tcp)
                .await
                .map_err(|e| e.to_string())?;
            tokio::task::spawn_local(async move {
                let _ = c.await;
            });
            sr
        }
    };
    let mut sr = sr.ready().await.map_err(|e| e.to_string())?;
    let req = http::Request::get(format!("http://{addr}{path}"))
        .header("user-agent", "spooky-health-check")
        .body(())
        .map_err(|e| e.to_string())?;
    let (resp, _) = sr.send_request(req, true).map_err(|e| e.to_string())?;
    let resp = resp.await.map_err(|e| e.to_string())?;
    let status = resp.status();
    let mut body = resp.into_body();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.map_err(|e| e.to_string())?;
        let _ = body.flow_control().release_capacity(chunk.len());
    }
    *conn = Some(sr);
    if status.is_success() {
        Ok(())
    } else {
        Err(format!("status {status}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thresholds_drive_transitions() {
        let h = BackendHealth::default();
        let cfg = HealthCheck::default();
        assert!(h.healthy());
        assert_eq!(h.check_result(false, &cfg), None);
        assert_eq!(h.check_result(false, &cfg), None);
        assert_eq!(h.check_result(false, &cfg), Some(HealthState::Unhealthy));
        assert!(!h.healthy());
        assert_eq!(h.check_result(true, &cfg), None);
        assert_eq!(h.check_result(true, &cfg), Some(HealthState::Healthy));
        assert!(h.healthy());
    }

    #[test]
    fn ejection_doubles_and_is_capped() {
        let h = BackendHealth::default();
        let now = Instant::now();
        let base = Duration::from_secs(10);
        assert_eq!(h.eject(now, base), Duration::from_secs(10));
        assert!(h.is_ejected(now));
        assert!(!h.is_ejected(now + Duration::from_secs(11)));
        assert_eq!(h.eject(now, base), Duration::from_secs(20));
        assert_eq!(h.eject(now, base), Duration::from_secs(40));
        for _ in 0..20 {
            h.eject(now, base);
        }
        assert_eq!(h.eject(now, base), MAX_EJECTION);
    }

    #[test]
    fn failures_count_until_success() {
        let h = BackendHealth::default();
        assert_eq!(h.record(false), 1);
        assert_eq!(h.record(false), 2);
        assert_eq!(h.record(true), 0);
    }
}
