//! Exponential backoff with jitter, shared by discovery (1 s..60 s) and the watches (500 ms..30 s).
//!
//! kube-runtime ships a backoff too, but its constructor is private behind `backon`; this one is
//! small, has exactly the bounds the plan asks for, and is unit-testable without a clock.

use std::time::Duration;

use rand::Rng;

/// Doubling delays from `min` up to `max`, each scaled by a random factor in `[0.5, 1.0]` so that
/// many watches failing together (an API server restart) do not retry in lockstep.
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    current: Duration,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Self {
        Self {
            min,
            max: max.max(min),
            current: min,
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

    /// The next delay to wait, with jitter; never below half of `min`, never above `max`.
    pub fn next_delay(&mut self) -> Duration {
        let base = self.current;
        self.current = (self.current * 2).min(self.max);
        let factor: f64 = rand::rng().random_range(0.5..=1.0);
        base.mul_f64(factor)
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
}
