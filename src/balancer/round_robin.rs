//! `round_robin`: each available backend in turn.

use std::cell::Cell;

use super::{BackendView, PickContext, Policy};

/// Plain round robin over available backends; weights are ignored.
///
/// [`Default`] starts at backend 0; [`super::build`] starts each instance at
/// a random offset so that workers do not all send their first request to
/// the same backend.
#[derive(Debug, Default)]
pub struct RoundRobin {
    next: Cell<usize>,
}

impl RoundRobin {
    /// A round robin whose first pick is the first available backend at or
    /// after `start` (modulo the number of backends).
    pub fn starting_at(start: usize) -> Self {
        RoundRobin {
            next: Cell::new(start),
        }
    }
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
    use super::super::tests::{ctx, views};
    use super::*;

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

    #[test]
    fn round_robin_none_when_all_unavailable() {
        let rr = RoundRobin::default();
        assert_eq!(rr.pick(&ctx(), &views(&[false, false])), None);
        // And resumes once one is back.
        assert_eq!(rr.pick(&ctx(), &views(&[false, true])), Some(1));
    }

    #[test]
    fn starting_at_wraps() {
        let rr = RoundRobin::starting_at(usize::MAX);
        let b = views(&[true, true, true]);
        assert!(rr.pick(&ctx(), &b).is_some());
    }
}
