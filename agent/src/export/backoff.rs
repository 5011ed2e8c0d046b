//! Reconnect delays: capped exponential backoff with jitter.
//!
//! Many agents lose the same collector at the same moment; without jitter they would all come
//! back in lock-step. Pure apart from the seed, so the schedule is unit-tested.

use std::time::Duration;

/// Delay schedule between reconnect attempts.
#[derive(Clone, Debug)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    /// Fraction of the delay added or removed at random (0.2: +-20%).
    jitter: f64,
    attempt: u32,
    rng: u64,
}

impl Backoff {
    /// Starts at `base`, doubles per failed attempt up to `max`, each delay moved by up to
    /// `jitter` (a fraction) either way. `seed` feeds the jitter.
    pub fn new(base: Duration, max: Duration, jitter: f64, seed: u64) -> Self {
        Backoff { base, max: max.max(base), jitter: jitter.clamp(0.0, 1.0), attempt: 0, rng: seed | 1 }
    }

    /// 200 ms doubling to 30 s, +-20%, seeded from the randomly keyed std hasher.
    pub fn standard() -> Self {
        use std::hash::{BuildHasher as _, Hasher as _};
        let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
        hasher.write_u32(std::process::id());
        Backoff::new(Duration::from_millis(200), Duration::from_secs(30), 0.2, hasher.finish())
    }

    /// The delay before the next attempt; each call counts one more failure.
    pub fn next_delay(&mut self) -> Duration {
        let exp = self.base.as_secs_f64() * 2f64.powi(self.attempt.min(30) as i32);
        let nominal = exp.min(self.max.as_secs_f64());
        self.attempt = self.attempt.saturating_add(1);
        let factor = 1.0 + self.jitter * (2.0 * self.unit() - 1.0);
        Duration::from_secs_f64((nominal * factor).max(0.0))
    }

    /// Back to the base delay, after a connection worked.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    /// Uniform in [0, 1) from xorshift64*.
    fn unit(&mut self) -> f64 {
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        (self.rng.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_to_the_cap_without_jitter() {
        let mut b = Backoff::new(Duration::from_millis(200), Duration::from_secs(30), 0.0, 1);
        let ms: Vec<u128> = (0..10).map(|_| b.next_delay().as_millis()).collect();
        assert_eq!(ms, vec![200, 400, 800, 1600, 3200, 6400, 12800, 25600, 30000, 30000]);
        b.reset();
        assert_eq!(b.next_delay(), Duration::from_millis(200));
    }

    #[test]
    fn jitter_stays_within_twenty_percent_and_varies() {
        let mut b = Backoff::new(Duration::from_millis(200), Duration::from_secs(30), 0.2, 42);
        let mut seen = std::collections::BTreeSet::new();
        for attempt in 0..200u32 {
            let nominal = (200.0 * 2f64.powi(attempt.min(30) as i32)).min(30_000.0);
            let d = b.next_delay().as_secs_f64() * 1000.0;
            assert!(d >= nominal * 0.8 - 1e-6 && d <= nominal * 1.2 + 1e-6, "attempt {attempt}: {d} ms");
            seen.insert(d as u64);
        }
        assert!(seen.len() > 50, "jitter should vary the delays");
    }

    #[test]
    fn huge_attempt_counts_do_not_overflow() {
        let mut b = Backoff::new(Duration::from_millis(200), Duration::from_secs(30), 0.2, 7);
        for _ in 0..10_000 {
            assert!(b.next_delay() <= Duration::from_secs(36));
        }
    }
}
