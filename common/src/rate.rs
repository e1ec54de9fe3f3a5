//! Rate limiting shared by both binaries: the writer's per-client message budget and the agent's per-type
//! request budget towards the API server.

use std::sync::Mutex;
use std::time::Duration;

// tokio's clock, so tests can run the bucket on a paused clock.
use tokio::time::Instant;

/// A token bucket: `rate` tokens per second, up to `burst` at once. Waiters take turns in arrival order, so one busy
/// user of a shared bucket cannot starve the others.
#[derive(Debug)]
pub struct TokenBucket {
    state: Mutex<(f64, Instant)>,
    turn: tokio::sync::Mutex<()>,
}

impl Default for TokenBucket {
    fn default() -> Self {
        Self::new()
    }
}

impl TokenBucket {
    pub fn new() -> Self {
        Self {
            state: Mutex::new((f64::NAN, Instant::now())),
            turn: tokio::sync::Mutex::new(()),
        }
    }

    /// How long to wait before one more message may be taken at `rate` per second with `burst` capacity
    /// (zero when a token was taken). Pure except for the clock passed in.
    pub fn take_at(&self, rate: f64, burst: f64, now: Instant) -> Duration {
        self.take_cost_at(rate, burst, 1.0, now)
    }

    /// [`take_at`](Self::take_at) for something that costs `cost` tokens (bytes, say). A cost above `burst` is
    /// charged as a full bucket, so it waits for the bucket to fill instead of forever.
    pub fn take_cost_at(&self, rate: f64, burst: f64, cost: f64, now: Instant) -> Duration {
        if rate <= 0.0 || !rate.is_finite() {
            return Duration::ZERO;
        }
        let burst = burst.max(1.0);
        let cost = cost.clamp(1.0, burst);
        let mut state = self.state.lock().expect("token bucket lock");
        let (tokens, last) = *state;
        let refilled = if tokens.is_nan() {
            burst
        } else {
            (tokens + now.saturating_duration_since(last).as_secs_f64() * rate).min(burst)
        };
        if refilled >= cost {
            *state = (refilled - cost, now);
            Duration::ZERO
        } else {
            *state = (refilled, now);
            Duration::from_secs_f64((cost - refilled) / rate)
        }
    }

    /// Waits until a message may be taken.
    pub async fn take(&self, rate: f64, burst: f64) {
        self.take_cost(rate, burst, 1.0).await;
    }

    /// Waits until something costing `cost` tokens may be taken (see [`take_cost_at`](Self::take_cost_at)).
    pub async fn take_cost(&self, rate: f64, burst: f64, cost: f64) {
        // tokio's Mutex is fair (FIFO): whoever waits longest gets the next token.
        let _turn = self.turn.lock().await;
        loop {
            let wait = self.take_cost_at(rate, burst, cost, Instant::now());
            if wait.is_zero() {
                return;
            }
            tokio::time::sleep(wait).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn costly_takes_spend_more_and_a_cost_above_the_burst_waits_for_a_full_bucket() {
        let bucket = TokenBucket::new();
        let start = Instant::now();
        // 1,000 bytes/s, burst 3,000: 2,500 bytes go at once, the next 1,000 wait 0.5 s.
        assert_eq!(
            bucket.take_cost_at(1000.0, 3000.0, 2500.0, start),
            Duration::ZERO
        );
        let wait = bucket.take_cost_at(1000.0, 3000.0, 1000.0, start);
        assert_eq!(wait, Duration::from_millis(500));
        // 10,000 bytes cost a full bucket (3,000): refilled after 3 s, not never.
        let later = start + Duration::from_secs(10);
        assert_eq!(
            bucket.take_cost_at(1000.0, 3000.0, 10_000.0, later),
            Duration::ZERO
        );
        assert_eq!(
            bucket.take_cost_at(1000.0, 3000.0, 10_000.0, later),
            Duration::from_secs(3)
        );
    }

    #[test]
    fn token_bucket_allows_a_burst_then_the_rate() {
        let bucket = TokenBucket::new();
        let start = Instant::now();
        for _ in 0..3 {
            assert_eq!(bucket.take_at(10.0, 3.0, start), Duration::ZERO);
        }
        let wait = bucket.take_at(10.0, 3.0, start);
        assert!(
            wait > Duration::ZERO && wait <= Duration::from_millis(100),
            "{wait:?}"
        );
        assert_eq!(
            bucket.take_at(10.0, 3.0, start + Duration::from_millis(100)),
            Duration::ZERO
        );
        assert_eq!(
            bucket.take_at(0.0, 0.0, start),
            Duration::ZERO,
            "0 = unlimited"
        );
    }
}
