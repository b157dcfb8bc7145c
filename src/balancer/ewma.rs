//! `ewma`: peak-EWMA latency × load, by power of two choices.

use std::cell::Cell;
use std::time::{Duration, Instant};

use super::p2c::{self, Rng};
use super::{BackendView, PickContext, Policy};

/// Peak-EWMA (Finagle's and Linkerd's "peak EWMA") with power of two choices.
///
/// Per backend, a latency estimate:
/// * a sample above the estimate replaces it at once (**peak**): a backend
///   that slows down is avoided on its first slow answer;
/// * a sample below it pulls the estimate towards it with weight
///   `1 - exp(-Δt / 10 s)`, `Δt` the time since the previous sample: a
///   backend earns its traffic back over seconds, not on one fast answer;
/// * a failure (`ok == false`) counts as at least [`Ewma::FAILURE_PENALTY`];
/// * while a backend gets no samples its estimate decays towards zero with
///   the same time constant, so an avoided backend is eventually tried again
///   (and, if still slow, avoided again after that one request).
///
/// The cost of a backend is `estimate × (in_flight + 1)`: latency-aware and
/// load-aware. A pick draws two distinct available backends at random and
/// takes the cheaper (power of two choices: no herding of all workers onto
/// the single "best" backend). A backend with no sample yet costs
/// [`Ewma::DEFAULT_LATENCY`].
#[derive(Debug)]
pub struct Ewma {
    stats: Box<[Cell<Stat>]>,
    rng: Rng,
}

#[derive(Debug, Clone, Copy)]
struct Stat {
    /// Estimate, in nanoseconds.
    estimate: f64,
    /// When the last sample came in; `None` before the first one.
    stamp: Option<Instant>,
}

const FRESH: Stat = Stat {
    estimate: 0.0,
    stamp: None,
};

impl Ewma {
    /// Time constant of the moving average.
    pub const DECAY: Duration = Duration::from_secs(10);
    /// Cost of a backend that has not answered yet: small, so that new (and
    /// newly re-added) backends get traffic and a first measurement.
    pub const DEFAULT_LATENCY: Duration = Duration::from_millis(1);
    /// Latency a failed request counts as (at least).
    pub const FAILURE_PENALTY: Duration = Duration::from_secs(1);

    pub fn new(n: usize) -> Self {
        Self::with_rng(n, Rng::from_entropy())
    }

    /// A deterministic instance, for tests and simulations.
    pub fn with_seed(n: usize, seed: u64) -> Self {
        Self::with_rng(n, Rng::seeded(seed))
    }

    fn with_rng(n: usize, rng: Rng) -> Self {
        Ewma {
            stats: (0..n).map(|_| Cell::new(FRESH)).collect(),
            rng,
        }
    }

    /// [`Policy::pick`] at time `now`.
    pub fn pick_at(&self, backends: &[BackendView], now: Instant) -> Option<usize> {
        p2c::pick(&self.rng, backends, |a, b| {
            self.cost(a, &backends[a], now) < self.cost(b, &backends[b], now)
        })
    }

    /// [`Policy::observe`] at time `now`.
    pub fn observe_at(&self, backend: usize, latency: Duration, ok: bool, now: Instant) {
        let Some(cell) = self.stats.get(backend) else {
            return;
        };
        let sample = if ok {
            latency
        } else {
            latency.max(Ewma::FAILURE_PENALTY)
        };
        let sample = sample.as_nanos() as f64;
        let mut s = cell.get();
        s.estimate = match s.stamp {
            None => sample,
            Some(_) if sample > s.estimate => sample,
            Some(then) => {
                let w = decay(now.saturating_duration_since(then));
                s.estimate * w + sample * (1.0 - w)
            }
        };
        s.stamp = Some(now);
        cell.set(s);
    }

    /// Latency estimate of `backend` at `now`, in nanoseconds.
    pub fn estimate_at(&self, backend: usize, now: Instant) -> f64 {
        match self.stats.get(backend).map(Cell::get) {
            Some(Stat {
                estimate,
                stamp: Some(then),
            }) => estimate * decay(now.saturating_duration_since(then)),
            _ => Ewma::DEFAULT_LATENCY.as_nanos() as f64,
        }
    }

    fn cost(&self, i: usize, b: &BackendView, now: Instant) -> f64 {
        self.estimate_at(i, now) * (f64::from(b.in_flight) + 1.0)
    }
}

/// `exp(-Δt / DECAY)`.
fn decay(dt: Duration) -> f64 {
    (-dt.as_secs_f64() / Ewma::DECAY.as_secs_f64()).exp()
}

impl Policy for Ewma {
    fn name(&self) -> &'static str {
        "ewma"
    }

    fn pick(&self, _ctx: &PickContext<'_>, backends: &[BackendView]) -> Option<usize> {
        self.pick_at(backends, Instant::now())
    }

    fn observe(&self, backend: usize, latency: Duration, ok: bool) {
        self.observe_at(backend, latency, ok, Instant::now());
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::super::tests::views;
    use super::*;
    use proptest::prelude::*;
    use std::cmp::Reverse;
    use std::collections::BinaryHeap;

    const MS: Duration = Duration::from_millis(1);

    /// Open-loop simulation: one request every `gap`, each backend answers
    /// after its latency, `in_flight` tracked. Returns the picks after
    /// `warmup` requests.
    fn simulate(latencies: &[Duration], gap: Duration, warmup: usize, n: usize) -> Vec<usize> {
        let p = Ewma::with_seed(latencies.len(), 42);
        let mut b = views(&vec![true; latencies.len()]);
        let t0 = Instant::now();
        let mut done: BinaryHeap<Reverse<(Duration, usize)>> = BinaryHeap::new();
        let mut picks = Vec::new();
        for k in 0..warmup + n {
            let now = gap * k as u32;
            while let Some(Reverse((at, i))) = done.peek().copied() {
                if at > now {
                    break;
                }
                done.pop();
                b[i].in_flight -= 1;
                p.observe_at(i, latencies[i], true, t0 + at);
            }
            let i = p.pick_at(&b, t0 + now).unwrap();
            b[i].in_flight += 1;
            done.push(Reverse((now + latencies[i], i)));
            if k >= warmup {
                picks.push(i);
            }
        }
        picks
    }

    #[test]
    fn steers_away_from_slow_backend() {
        // Backend 0 is 10× slower than the others.
        for n in 2..=5 {
            let mut lat = vec![10 * MS; n];
            lat[0] = 100 * MS;
            let picks = simulate(&lat, MS, 2_000, 20_000);
            let slow = picks.iter().filter(|&&i| i == 0).count() as f64 / picks.len() as f64;
            eprintln!("ewma: {n} backends, 10x slow backend share {:.4}", slow);
            assert!(slow <= 0.2, "slow backend got {slow} with {n} backends");
        }
    }

    #[test]
    fn peak_then_decay() {
        let p = Ewma::with_seed(1, 1);
        let t0 = Instant::now();
        assert_eq!(
            p.estimate_at(0, t0),
            Ewma::DEFAULT_LATENCY.as_nanos() as f64
        );
        p.observe_at(0, 10 * MS, true, t0);
        p.observe_at(0, 200 * MS, true, t0 + MS);
        // Peak: jumps straight up.
        assert_eq!(p.estimate_at(0, t0 + MS), (200 * MS).as_nanos() as f64);
        // Decays toward a lower sample with the 10 s time constant.
        p.observe_at(0, 10 * MS, true, t0 + MS + Ewma::DECAY);
        let e = p.estimate_at(0, t0 + MS + Ewma::DECAY) / 1e6;
        let expected = 200.0 / std::f64::consts::E + 10.0 * (1.0 - 1.0 / std::f64::consts::E);
        assert!((e - expected).abs() < 1e-6, "{e} vs {expected}");
        // A failure counts as the penalty.
        p.observe_at(0, MS, false, t0 + 2 * Ewma::DECAY);
        assert_eq!(
            p.estimate_at(0, t0 + 2 * Ewma::DECAY),
            Ewma::FAILURE_PENALTY.as_nanos() as f64
        );
        // Idle: decays toward zero.
        assert!(
            p.estimate_at(0, t0 + 10 * Ewma::DECAY)
                < Ewma::FAILURE_PENALTY.as_nanos() as f64 * 0.01
        );
    }

    #[test]
    fn new_backend_gets_traffic() {
        let p = Ewma::with_seed(3, 9);
        let t0 = Instant::now();
        let b = views(&[true, true, true]);
        p.observe_at(0, 20 * MS, true, t0);
        p.observe_at(1, 20 * MS, true, t0);
        let picks: Vec<_> = (0..300).map(|_| p.pick_at(&b, t0).unwrap()).collect();
        // Backend 2 has no sample: default cost, wins every pair it is in.
        let share = picks.iter().filter(|&&i| i == 2).count() as f64 / 300.0;
        assert!(share > 0.5, "{share}");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]

        #[test]
        fn never_unavailable(
            avail in prop::collection::vec(any::<bool>(), 1..=12),
            samples in prop::collection::vec((0usize..12, 0u64..2_000, any::<bool>()), 0..40),
            seed in any::<u64>(),
        ) {
            let p = Ewma::with_seed(avail.len(), seed);
            let t0 = Instant::now();
            for (k, (i, ms, ok)) in samples.iter().enumerate() {
                p.observe_at(*i, Duration::from_millis(*ms), *ok, t0 + MS * k as u32);
            }
            let b = views(&avail);
            for k in 0..50u32 {
                match p.pick_at(&b, t0 + MS * k) {
                    Some(i) => prop_assert!(b[i].available),
                    None => prop_assert!(!avail.iter().any(|a| *a)),
                }
            }
        }
    }
}
