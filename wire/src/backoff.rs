//! Exponential backoff with jitter for reconnect loops: 0.2 s doubling to 10 s, ±20 % jitter, reset
//! after a success.

use std::time::Duration;

/// Delays between attempts.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    current: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new(Duration::from_millis(200), Duration::from_secs(10))
    }
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration) -> Self {
        Self {
            initial,
            max,
            current: initial,
        }
    }

    /// The delay before the next attempt (then doubles, up to the maximum).
    pub fn next_delay(&mut self) -> Duration {
        let base = self.current;
        self.current = (self.current * 2).min(self.max);
        let jitter = rand::random::<f64>() * 0.4 + 0.8;
        base.mul_f64(jitter)
    }

    /// Back to the initial delay (after a success).
    pub fn reset(&mut self) {
        self.current = self.initial;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_to_the_cap_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(400));
        let delays: Vec<u128> = (0..5).map(|_| b.next_delay().as_millis()).collect();
        assert!((80..=120).contains(&delays[0]), "{delays:?}");
        assert!((320..=480).contains(&delays[4]), "{delays:?}");
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(120));
    }
}
