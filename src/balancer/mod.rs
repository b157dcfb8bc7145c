//! Backend selection behind one small trait.
//!
//! A policy sees the backends of one upstream and what the caller knows of
//! the request, and returns an index. Round robin is the only policy wired in
//! today; the other `policy:` values are parsed and validated, run as round
//! robin, and `spooky check` says so.

use std::cell::Cell;
use std::net::SocketAddr;

/// What a policy may look at when picking.
#[derive(Debug, Clone, Copy)]
pub struct PickContext<'a> {
    pub client: SocketAddr,
    pub path: &'a str,
    pub key_hash: Option<u64>,
}

/// Per-backend facts a policy may use.
#[derive(Debug, Clone, Copy)]
pub struct BackendView {
    pub address: SocketAddr,
    pub weight: u32,
    /// False while the backend is known to be unreachable (connect backoff).
    pub available: bool,
    pub in_flight: u32,
}

/// A load-balancing policy. `pick` returns an index into `backends`, or
/// `None` when no backend may be used.
pub trait Policy {
    fn name(&self) -> &'static str;
    fn pick(&self, ctx: &PickContext<'_>, backends: &[BackendView]) -> Option<usize>;
    fn observe(&self, _backend: usize, _latency: std::time::Duration, _ok: bool) {}
}

/// Stable hash for keys.
pub fn hash_bytes(data: &[u8]) -> u64 {
    // FNV-1a: stable across processes.
    data.iter().fold(0xcbf29ce484222325u64, |h, b| {
        (h ^ *b as u64).wrapping_mul(0x100000001b3)
    })
}

/// Builds the policy for an upstream.
pub fn build(_policy: crate::config::Policy, _backends: &[(SocketAddr, u32)]) -> Box<dyn Policy> {
    Box::new(RoundRobin::default())
}

/// Plain round robin over available backends.
#[derive(Debug, Default)]
pub struct RoundRobin {
    next: Cell<usize>,
}

impl Policy for RoundRobin {
    fn name(&self) -> &'static str {
        "round_robin"
    }

    fn pick(&self, _ctx: &PickContext<'_>, backends: &[BackendView]) -> Option<usize> {
        let n = backends.len();
        if n == 0 {
            return None;
        }
        let start = self.next.get() % n;
        for i in 0..n {
            let idx = (start + i) % n;
            if backends[idx].available {
                self.next.set(idx + 1);
                return Some(idx);
            }
        }
        None
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn views(avail: &[bool]) -> Vec<BackendView> {
        avail
            .iter()
            .enumerate()
            .map(|(i, a)| BackendView {
                address: SocketAddr::from(([127, 0, 0, 1], 9000 + i as u16)),
                weight: 1,
                available: *a,
                in_flight: 0,
            })
            .collect()
    }

    fn ctx() -> PickContext<'static> {
        PickContext {
            client: SocketAddr::from(([127, 0, 0, 1], 1)),
            path: "/",
            key_hash: None,
        }
    }

    #[test]
    fn round_robin_alternates_evenly() {
        let rr = RoundRobin::default();
        let b = views(&[true, true, true]);
        let picks: Vec<_> = (0..6).filter_map(|_| rr.pick(&ctx(), &b)).collect();
        assert_eq!(picks, vec![0, 1, 2, 0, 1, 2]);
    }

    #[test]
    fn round_robin_skips_unavailable() {
        let rr = RoundRobin::default();
        let b = views(&[true, false, true]);
        let picks: Vec<_> = (0..4).filter_map(|_| rr.pick(&ctx(), &b)).collect();
        assert_eq!(picks, vec![0, 2, 0, 2]);
        assert_eq!(rr.pick(&ctx(), &[]), None);
    }
}
