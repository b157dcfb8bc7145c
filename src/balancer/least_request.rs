//! `least_request`: fewest requests in flight, by power of two choices.

use super::p2c::{self, Rng};
use super::{BackendView, PickContext, Policy};

/// Power of two choices on [`BackendView::in_flight`]: draw two distinct
/// available backends at random, send to the one with fewer requests in
/// flight; on a tie the higher weight wins (then the first draw).
///
/// Two random choices instead of the global minimum: every worker has its
/// own (slightly stale) view of load, and "everyone picks the least loaded"
/// makes all workers herd onto the same backend, while two choices are
/// almost as good as the minimum (max load `O(log log n)` vs `O(log n)` for
/// one random choice) without herding. With two available backends it is
/// the exact minimum; the most loaded backend is never picked while another
/// is available.
#[derive(Debug)]
pub struct LeastRequest {
    rng: Rng,
}

impl LeastRequest {
    pub fn new() -> Self {
        LeastRequest {
            rng: Rng::from_entropy(),
        }
    }

    /// A deterministic instance, for tests and simulations.
    pub fn with_seed(seed: u64) -> Self {
        LeastRequest {
            rng: Rng::seeded(seed),
        }
    }
}

impl Default for LeastRequest {
    fn default() -> Self {
        Self::new()
    }
}

impl Policy for LeastRequest {
    fn name(&self) -> &'static str {
        "least_request"
    }

    fn pick(&self, _ctx: &PickContext<'_>, backends: &[BackendView]) -> Option<usize> {
        p2c::pick(&self.rng, backends, |a, b| {
            let (a, b) = (&backends[a], &backends[b]);
            (a.in_flight, std::cmp::Reverse(a.weight)) < (b.in_flight, std::cmp::Reverse(b.weight))
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::super::tests::{ctx, views};
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn prefers_fewer_in_flight() {
        let p = LeastRequest::with_seed(1);
        let mut b = views(&[true, true, true, true]);
        for (i, v) in b.iter_mut().enumerate() {
            v.in_flight = [0, 5, 10, 20][i];
        }
        let mut counts = [0usize; 4];
        for _ in 0..60_000 {
            counts[p.pick(&ctx(), &b).unwrap()] += 1;
        }
        // P2C over 4 distinct loads: rank r wins with probability
        // 2(3 - r)/12, i.e. 1/2, 1/3, 1/6, 0.
        for (c, expected) in counts.iter().zip([0.5, 1.0 / 3.0, 1.0 / 6.0, 0.0]) {
            assert!((*c as f64 / 60_000.0 - expected).abs() < 0.01, "{counts:?}");
        }
    }

    #[test]
    fn tie_goes_to_heavier() {
        let p = LeastRequest::with_seed(2);
        let mut b = views(&[true, true]);
        b[0].weight = 1;
        b[1].weight = 5;
        b[0].in_flight = 3;
        b[1].in_flight = 3;
        assert!((0..100).all(|_| p.pick(&ctx(), &b) == Some(1)));
        b[1].in_flight = 4;
        assert!((0..100).all(|_| p.pick(&ctx(), &b) == Some(0)));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]

        /// Never an unavailable backend; never the unique most loaded one
        /// while another is available; on average below the mean load.
        #[test]
        fn picks_lightly_loaded(
            cfg in prop::collection::vec((any::<bool>(), 0u32..50), 1..=12),
            seed in any::<u64>(),
        ) {
            let mut b = views(&cfg.iter().map(|c| c.0).collect::<Vec<_>>());
            for (v, c) in b.iter_mut().zip(&cfg) {
                v.in_flight = c.1;
            }
            let p = LeastRequest::with_seed(seed);
            let avail: Vec<u32> = b.iter().filter(|v| v.available).map(|v| v.in_flight).collect();
            let max = avail.iter().copied().max();
            let unique_max = max.filter(|m| avail.len() > 1 && avail.iter().filter(|x| *x == m).count() == 1);
            let mut sum = 0u64;
            for _ in 0..2000 {
                match p.pick(&ctx(), &b) {
                    None => prop_assert!(avail.is_empty()),
                    Some(i) => {
                        prop_assert!(b[i].available);
                        prop_assert!(Some(b[i].in_flight) != unique_max);
                        sum += u64::from(b[i].in_flight);
                    }
                }
            }
            if !avail.is_empty() {
                let mean = avail.iter().map(|&x| f64::from(x)).sum::<f64>() / avail.len() as f64;
                prop_assert!(sum as f64 / 2000.0 <= mean + 1e-9);
            }
        }
    }
}
