//! What the sans-IO layers (`edge`, `router`) cannot compute from their
//! inputs: wall-clock time and randomness. They take both from a
//! [`Source`] the runtime supplies ([`SystemSource`]), so tests and fuzz
//! targets can run them on a [`FakeSource`]: a seeded generator and a clock
//! that moves only when told. Monotonic time is not here: every input takes
//! `now: Instant` as an argument.

use std::time::{Duration, SystemTime};

use rand::RngCore;

/// Wall-clock time and randomness for the sans-IO layers.
pub trait Source {
    /// Wall-clock time: Retry tokens carry an expiry that every worker and
    /// node must read the same way, so it cannot be an `Instant`.
    fn wall_clock(&self) -> SystemTime;
    /// Fills `buf` with unpredictable bytes (connection IDs, token keys,
    /// trace ids).
    fn fill_random(&mut self, buf: &mut [u8]);
}

/// The real world: `SystemTime::now()` and the thread's CSPRNG.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemSource;

impl Source for SystemSource {
    fn wall_clock(&self) -> SystemTime {
        SystemTime::now()
    }

    fn fill_random(&mut self, buf: &mut [u8]) {
        rand::thread_rng().fill_bytes(buf);
    }
}

/// A deterministic source for tests and fuzzing: splitmix64 from a seed,
/// and a wall clock that starts at `start` and moves by [`FakeSource::advance`].
#[derive(Debug, Clone)]
pub struct FakeSource {
    state: u64,
    wall: SystemTime,
}

impl FakeSource {
    pub fn new(seed: u64, start: SystemTime) -> Self {
        Self {
            state: seed,
            wall: start,
        }
    }

    /// Moves the wall clock forward.
    pub fn advance(&mut self, by: Duration) {
        self.wall += by;
    }

    fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

impl Source for FakeSource {
    fn wall_clock(&self) -> SystemTime {
        self.wall
    }

    fn fill_random(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fake_source_repeats_for_a_seed_and_its_clock_moves_only_when_told() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let (mut a, mut b) = (FakeSource::new(7, t0), FakeSource::new(7, t0));
        let (mut x, mut y) = ([0u8; 20], [0u8; 20]);
        a.fill_random(&mut x);
        b.fill_random(&mut y);
        assert_eq!(x, y);
        a.fill_random(&mut x);
        assert_ne!(x, y, "the next draw differs");
        assert_eq!(a.wall_clock(), t0);
        a.advance(Duration::from_secs(5));
        assert_eq!(a.wall_clock(), t0 + Duration::from_secs(5));
    }
}
