//! What to do with a delivery whose handler failed: retry after a backoff, or dead-letter it.

use std::time::Duration;

/// Retry policy for failed handlers.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    /// Deliveries before dead-lettering, the first included. 5: a transient fault (a
    /// dependency restarting) is ridden out, a poison message is set aside within seconds.
    pub max_attempts: u32,
    /// Backoff before the second attempt; doubles each time. 200 ms.
    pub base: Duration,
    /// Longest backoff. 30 s.
    pub max: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 5,
            base: Duration::from_millis(200),
            max: Duration::from_secs(30),
        }
    }
}

/// The decision for a failed delivery.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Redeliver after this delay.
    Retry(Duration),
    /// Give up: send to the dead-letter destination with the error.
    DeadLetter,
}

impl RetryPolicy {
    /// After delivery `attempt` (1-based) failed.
    pub fn decide(&self, attempt: u32) -> Decision {
        if attempt >= self.max_attempts {
            return Decision::DeadLetter;
        }
        let exp = attempt.saturating_sub(1).min(30);
        let delay = self.base.saturating_mul(1u32 << exp).min(self.max);
        Decision::Retry(delay)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_its_cap_then_the_message_is_dead_lettered() {
        let p = RetryPolicy {
            max_attempts: 5,
            base: Duration::from_millis(200),
            max: Duration::from_millis(1000),
        };
        assert_eq!(p.decide(1), Decision::Retry(Duration::from_millis(200)));
        assert_eq!(p.decide(2), Decision::Retry(Duration::from_millis(400)));
        assert_eq!(p.decide(3), Decision::Retry(Duration::from_millis(800)));
        assert_eq!(p.decide(4), Decision::Retry(Duration::from_millis(1000)));
        assert_eq!(p.decide(5), Decision::DeadLetter);
        assert_eq!(p.decide(50), Decision::DeadLetter);
    }
}
