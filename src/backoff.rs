//! Exponential backoff with jitter, for reconnects and publish retries.
//!
//! "Equal jitter": a uniform delay between half the exponential cap and the cap. The
//! jitter spreads the retries of many sidecars that lost the same broker at the same
//! moment; the lower half-bound keeps a retry storm from forming near zero.

use std::time::Duration;

use rand::Rng;

use crate::config::RetryConfig;

/// Delay before attempt `attempt` (0-based: the first retry is attempt 0).
pub fn delay(cfg: &RetryConfig, attempt: u32) -> Duration {
    let cap = cfg
        .initial_backoff_ms
        .saturating_mul(1u64 << attempt.min(20))
        .min(cfg.max_backoff_ms);
    Duration::from_millis(rand::rng().random_range(cap / 2..=cap))
}

/// A uniform delay between half and one and a half times `around`.
pub fn jittered(around: Duration) -> Duration {
    let ms = around.as_millis() as u64;
    Duration::from_millis(rand::rng().random_range(ms / 2..=ms + ms / 2))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_and_is_capped() {
        let cfg = RetryConfig {
            initial_backoff_ms: 100,
            max_backoff_ms: 1000,
        };
        for _ in 0..100 {
            let d0 = delay(&cfg, 0).as_millis();
            assert!((50..=100).contains(&d0), "{d0}");
            let d3 = delay(&cfg, 3).as_millis();
            assert!((400..=800).contains(&d3), "{d3}");
            let d30 = delay(&cfg, 30).as_millis();
            assert!((500..=1000).contains(&d30), "{d30}");
            let j = jittered(Duration::from_millis(1000)).as_millis();
            assert!((500..=1500).contains(&j), "{j}");
        }
    }
}
