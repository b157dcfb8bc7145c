//! Power of two choices, shared by `ewma` and `least_request`.

use std::cell::Cell;

use super::BackendView;

/// A small non-cryptographic generator (SplitMix64) in a `Cell`: one per
/// policy instance, seeded from the OS unless a test gives a seed.
#[derive(Debug)]
pub(crate) struct Rng {
    state: Cell<u64>,
}

impl Rng {
    pub(crate) fn seeded(seed: u64) -> Self {
        Rng {
            state: Cell::new(seed),
        }
    }

    pub(crate) fn from_entropy() -> Self {
        Self::seeded(rand::random())
    }

    fn next_u64(&self) -> u64 {
        let s = self.state.get().wrapping_add(0x9e37_79b9_7f4a_7c15);
        self.state.set(s);
        super::fmix64(s)
    }

    /// Uniform in `0..n` (`n > 0`), by multiply-shift.
    pub(crate) fn below(&self, n: usize) -> usize {
        ((u128::from(self.next_u64()) * n as u128) >> 64) as usize
    }
}

/// Two distinct available backends drawn uniformly at random; `better(a, b)`
/// says whether `a` should win over `b`. A single available backend is
/// returned as is; none gives `None`. O(N), no allocation.
pub(crate) fn pick(
    rng: &Rng,
    backends: &[BackendView],
    better: impl Fn(usize, usize) -> bool,
) -> Option<usize> {
    let k = backends.iter().filter(|b| b.available).count();
    if k == 0 {
        return None;
    }
    let r1 = rng.below(k);
    if k == 1 {
        return nth_available(backends, 0);
    }
    let mut r2 = rng.below(k - 1);
    if r2 >= r1 {
        r2 += 1;
    }
    let a = nth_available(backends, r1)?;
    let b = nth_available(backends, r2)?;
    Some(if better(b, a) { b } else { a })
}

fn nth_available(backends: &[BackendView], n: usize) -> Option<usize> {
    backends
        .iter()
        .enumerate()
        .filter(|(_, b)| b.available)
        .nth(n)
        .map(|(i, _)| i)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::super::tests::views;
    use super::*;

    #[test]
    fn pairs_are_distinct_and_uniform() {
        let rng = Rng::seeded(7);
        let b = views(&[true, false, true, true]);
        let mut counts = [0usize; 4];
        for _ in 0..30_000 {
            // `better` always false: the first draw wins, so this counts first draws.
            counts[pick(&rng, &b, |_, _| false).unwrap()] += 1;
        }
        assert_eq!(counts[1], 0);
        for &i in &[0, 2, 3] {
            assert!(
                (counts[i] as f64 / 30_000.0 - 1.0 / 3.0).abs() < 0.02,
                "{counts:?}"
            );
        }
        // `better` always true: the second draw wins; it never equals the first.
        let two = views(&[true, true]);
        for seed in 0..100 {
            let first = pick(&Rng::seeded(seed), &two, |_, _| false).unwrap();
            let second = pick(&Rng::seeded(seed), &two, |_, _| true).unwrap();
            assert_ne!(first, second);
        }
    }
}
