//! Per-key token buckets (in memory: limits protect the grid from bursts;
//! quotas that must survive restarts are counted in SQLite instead).

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Instant;

#[derive(Default)]
pub struct RateLimiter {
    buckets: Mutex<BTreeMap<(String, &'static str), Bucket>>,
}

struct Bucket {
    tokens: f64,
    at: Instant,
}

impl RateLimiter {
    /// Takes one token from `key`'s `kind` bucket refilled at `per_min`
    /// (capacity `per_min`). `Err(seconds)` until a token is available.
    pub fn take(&self, key: &str, kind: &'static str, per_min: u32) -> Result<(), u64> {
        let rate = per_min.max(1) as f64 / 60.0;
        let cap = per_min.max(1) as f64;
        let now = Instant::now();
        let mut buckets = self.buckets.lock().expect("limiter lock");
        let b = buckets.entry((key.to_string(), kind)).or_insert(Bucket {
            tokens: cap,
            at: now,
        });
        b.tokens = (b.tokens + now.duration_since(b.at).as_secs_f64() * rate).min(cap);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            Ok(())
        } else {
            Err(((1.0 - b.tokens) / rate).ceil() as u64)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_is_cut_at_capacity_with_a_retry_time() {
        let l = RateLimiter::default();
        for _ in 0..3 {
            l.take("k", "create", 3).unwrap();
        }
        let wait = l.take("k", "create", 3).unwrap_err();
        assert!((1..=20).contains(&wait), "{wait}");
        // Other keys and kinds have their own buckets.
        l.take("k2", "create", 3).unwrap();
        l.take("k", "request", 3).unwrap();
    }
}
