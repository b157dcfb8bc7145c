//! `weighted`: smooth weighted round robin (nginx's algorithm).

use std::cell::RefCell;

use super::{weight_of, BackendView, PickContext, Policy};

/// Smooth weighted round robin over the available backends.
///
/// Each pick, every available backend's *current weight* grows by its
/// weight; the largest current weight wins (ties: lowest index) and loses
/// the total weight `W` of the available backends. Over any `W` consecutive
/// picks from the zero state, backend `i` gets exactly `w_i` picks, and the
/// picks are interleaved rather than sent in bursts: weights `{5, 1, 1}` give
/// `a a b a c a a`, not `a a a a a b c`.
///
/// # Smoothness
///
/// With the set of available backends and their weights fixed, let `W` be
/// their total weight and `m_i` the smallest weight among the *other*
/// available backends. A run of consecutive picks of backend `i` that follows
/// a pick of some other backend `p` has length
///
/// ```text
/// k  <=  floor(2W / (W - w_i + m_i))
/// ```
///
/// Proof: with `c` the current weights right after `p`'s pick, `p` won over
/// `i`, so `c_p + W >= c_i`. At the `k`-th pick of the run `i` still wins
/// over `p`: `c_i + k*w_i - (k-1)*W >= c_p + k*w_p`. Together,
/// `2W >= k*(W - w_i + w_p) >= k*(W - w_i + m_i)`. The bound uses only the
/// pick rule, so it holds from any state (for instance after an
/// availability change); the first run from the zero state is shorter
/// still (`k*(W - w_i + m_i) <= W`).
///
/// A tighter bound holds in every case we checked (exhaustively for up to 4
/// backends with weights up to 8 and 3 backends up to 10, and on tens of
/// thousands of random sets of up to 9 backends with weights up to 100), but
/// without a proof: `k <= ceil(w_i / M_i)` with `M_i` the *largest* other
/// weight. It implies `k <= ceil(w_i / m_i)`, and means a backend is never
/// picked twice in a row while another one is at least as heavy. The tests
/// check both bounds.
///
/// A backend's current weight is reset to zero while it is unavailable, so
/// it comes back neutral rather than with old credit or debt.
#[derive(Debug, Default)]
pub struct Weighted {
    current: RefCell<Vec<i64>>,
}

impl Weighted {
    /// State for `n` backends (grown on demand if a longer list shows up).
    pub fn new(n: usize) -> Self {
        Weighted {
            current: RefCell::new(vec![0; n]),
        }
    }
}

impl Policy for Weighted {
    fn name(&self) -> &'static str {
        "weighted"
    }

    fn pick(&self, _ctx: &PickContext<'_>, backends: &[BackendView]) -> Option<usize> {
        let mut current = self.current.borrow_mut();
        if current.len() != backends.len() {
            current.resize(backends.len(), 0);
        }
        let mut total: i64 = 0;
        let mut best: Option<(usize, i64)> = None;
        for (i, (b, cur)) in backends.iter().zip(current.iter_mut()).enumerate() {
            if !b.available {
                *cur = 0;
                continue;
            }
            let w = i64::from(weight_of(b.weight));
            total += w;
            *cur += w;
            // Strictly greater: ties go to the lowest index.
            if best.is_none_or(|(_, c)| *cur > c) {
                best = Some((i, *cur));
            }
        }
        let (idx, _) = best?;
        current[idx] -= total;
        Some(idx)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
pub(crate) mod tests {
    use super::super::tests::{ctx, weighted_views};
    use super::*;
    use proptest::prelude::*;

    /// `n` picks with every backend available; returns the pick sequence.
    pub(crate) fn sequence(weights: &[u32], n: usize) -> Vec<usize> {
        let b = weighted_views(weights);
        let p = Weighted::new(b.len());
        (0..n).map(|_| p.pick(&ctx(), &b).unwrap()).collect()
    }

    /// Longest run of consecutive picks, per backend.
    pub(crate) fn longest_runs(seq: &[usize], n: usize) -> Vec<usize> {
        let mut longest = vec![0; n];
        let mut run = 0;
        for (k, &i) in seq.iter().enumerate() {
            run = if k > 0 && seq[k - 1] == i { run + 1 } else { 1 };
            longest[i] = longest[i].max(run);
        }
        longest
    }

    /// Largest relative error `|count - expected| / expected` over backends.
    pub(crate) fn max_relative_error(weights: &[u32], seq: &[usize]) -> f64 {
        let total: f64 = weights.iter().map(|&w| f64::from(w)).sum();
        let mut counts = vec![0usize; weights.len()];
        for &i in seq {
            counts[i] += 1;
        }
        weights
            .iter()
            .zip(&counts)
            .map(|(&w, &c)| {
                let expected = seq.len() as f64 * f64::from(w) / total;
                (c as f64 - expected).abs() / expected
            })
            .fold(0.0, f64::max)
    }

    #[test]
    fn nginx_example_is_smooth() {
        assert_eq!(sequence(&[5, 1, 1], 7), vec![0, 0, 1, 0, 2, 0, 0]);
    }

    #[test]
    fn skips_unavailable_and_none_when_all_down() {
        let mut b = weighted_views(&[3, 1, 2]);
        b[0].available = false;
        let p = Weighted::new(3);
        let picks: Vec<_> = (0..300).map(|_| p.pick(&ctx(), &b).unwrap()).collect();
        assert!(picks.iter().all(|&i| i != 0));
        assert_eq!(picks.iter().filter(|&&i| i == 2).count(), 200);
        for v in &mut b {
            v.available = false;
        }
        assert_eq!(p.pick(&ctx(), &b), None);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]

        /// 100k picks land within 1% (relative) of each backend's share.
        #[test]
        fn converges_to_weights(weights in prop::collection::vec(1u32..=10, 2..=8)) {
            let seq = sequence(&weights, 100_000);
            let err = max_relative_error(&weights, &seq);
            prop_assert!(err <= 0.01, "relative error {err} for {weights:?}");
        }

        /// Runs of the same backend respect the proven bound
        /// `floor(2W / (W - w_i + m_i))` and the (checked, unproven) tighter
        /// `ceil(w_i / M_i)`, hence also `ceil(w_i / m_i)`.
        #[test]
        fn no_bursts(weights in prop::collection::vec(1u32..=10, 2..=8)) {
            let total: u32 = weights.iter().sum();
            // Several full periods (period = W picks), so runs that wrap
            // around a period boundary are seen too.
            let seq = sequence(&weights, 4 * total as usize);
            let runs = longest_runs(&seq, weights.len());
            for (i, &run) in runs.iter().enumerate() {
                let others = weights.iter().enumerate().filter(|&(j, _)| j != i).map(|(_, &w)| w);
                let min_other = others.clone().min().unwrap();
                let max_other = others.max().unwrap();
                let w = weights[i];
                let proven = (2 * total / (total - w + min_other)) as usize;
                prop_assert!(run <= proven, "backend {i} run {run} > proven {proven} for {weights:?}");
                prop_assert!(run <= w.div_ceil(max_other) as usize, "backend {i} run {run} for {weights:?}");
                prop_assert!(run <= w.div_ceil(min_other) as usize, "backend {i} run {run} for {weights:?}");
            }
        }
    }
}
