//! Exponential backoff with jitter, for every retry loop of both binaries: the agent's discovery (1 s..60 s), watch
//! restarts (500 ms..30 s) and writer stream reconnects, and the writer's flush retries.
//!
//! kube-runtime ships a backoff too, but its constructor is private behind `backon`; this one is small, has
//! exactly the bounds each caller asks for, and is unit-testable without a clock.

use std::time::Duration;

use rand::Rng;

/// Doubling delays from `min` up to `max`, each scaled by a random factor (by default in `[0.5, 1.0]`) so that
/// many clients failing together (an API server or writer restart) do not retry in lockstep. No delay exceeds
/// `max`.
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    /// The delay before jitter that the next failure waits.
    current: Duration,
    jitter: (f64, f64),
}

impl Backoff {
    /// Delays from `min` doubling up to `max`, jittered down to as little as half.
    pub fn new(min: Duration, max: Duration) -> Self {
        Self {
            min,
            max: max.max(min),
            current: min,
            jitter: (0.5, 1.0),
        }
    }

    /// Scales each delay by a random factor in `[low, high]` instead (still capped at `max`); `±20 %` is
    /// `with_jitter(0.8, 1.2)`.
    pub fn with_jitter(self, low: f64, high: f64) -> Self {
        assert!(
            0.0 < low && low <= high && high.is_finite(),
            "jitter factors must satisfy 0 < low <= high: {low}, {high}"
        );
        Self {
            jitter: (low, high),
            ..self
        }
    }

    /// Discovery failures: 1 s doubling to 60 s.
    pub fn discovery() -> Self {
        Self::new(Duration::from_secs(1), Duration::from_secs(60))
    }

    /// Watch restarts: 500 ms doubling to 30 s.
    pub fn watch() -> Self {
        Self::new(Duration::from_millis(500), Duration::from_secs(30))
    }

    /// The next delay to wait, with jitter; never above `max`.
    pub fn next_delay(&mut self) -> Duration {
        let base = self.current;
        self.current = self.current.saturating_mul(2).min(self.max);
        let (low, high) = self.jitter;
        let factor: f64 = rand::rng().random_range(low..=high);
        // `mul_f64` would panic past `Duration::MAX`.
        Duration::try_from_secs_f64(base.as_secs_f64() * factor)
            .unwrap_or(self.max)
            .min(self.max)
    }

    /// Back to `min` after a success.
    pub fn reset(&mut self) {
        self.current = self.min;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_up_to_the_cap_and_stay_within_jitter_bounds() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(60));
        let mut bases = vec![];
        for _ in 0..10 {
            let base = b.current;
            let d = b.next_delay();
            assert!(
                d >= base / 2 && d <= base,
                "{d:?} outside [{:?}, {base:?}]",
                base / 2
            );
            bases.push(base.as_secs());
        }
        assert_eq!(bases, vec![1, 2, 4, 8, 16, 32, 60, 60, 60, 60]);
    }

    #[test]
    fn reset_starts_over_at_the_minimum() {
        let mut b = Backoff::watch();
        for _ in 0..5 {
            b.next_delay();
        }
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(500));
    }

    /// The `n`th delay after a reset (the agent's stream reconnects and the writer's flush retries count attempts).
    fn backoff(initial: Duration, max: Duration, attempt: u32) -> Duration {
        let mut b = Backoff::new(initial, max).with_jitter(0.8, 1.2);
        (1..attempt).for_each(|_| {
            b.next_delay();
        });
        b.next_delay()
    }

    #[test]
    fn backoff_doubles_per_attempt_with_jitter_and_stays_under_the_cap() {
        let (initial, max) = (Duration::from_millis(500), Duration::from_secs(30));
        for _ in 0..100 {
            let first = backoff(initial, max, 1);
            assert!(first >= Duration::from_millis(400) && first <= Duration::from_millis(600));
            let third = backoff(initial, max, 3);
            assert!(third >= Duration::from_millis(1600) && third <= Duration::from_millis(2400));
            assert!(backoff(initial, max, 40) <= max);
            assert!(backoff(initial, max, 40) >= max.mul_f64(0.8));
        }
    }

    #[test]
    fn huge_bounds_saturate_instead_of_overflowing() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::MAX).with_jitter(0.8, 1.2);
        for _ in 0..100 {
            assert!(b.next_delay() >= Duration::from_millis(800));
        }
    }
}
