//! Request rate limits per API token (connection limits are in [`super::serve`]).
//!
//! A token bucket per API token, checked by the auth middleware right after the token is
//! recognised: a token may send `rate` requests at once, then `rate` per second on average;
//! beyond that it gets `429 rate_limited` with `Retry-After`.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use crate::auth::Auth;

/// A token bucket.
#[derive(Debug)]
struct Bucket {
    /// Requests per second, and also the most that may be sent at once.
    rate: f64,
    available: f64,
    last: Instant,
}

impl Bucket {
    /// Takes one request's worth, or says how long until one is available.
    fn take(&mut self, now: Instant) -> Result<(), Duration> {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.available = (self.available + elapsed * self.rate).min(self.rate);
        if self.available >= 1.0 {
            self.available -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - self.available) / self.rate))
        }
    }
}

/// The request rate limits of the configured tokens.
#[derive(Debug, Default)]
pub struct RateLimits {
    buckets: HashMap<String, Mutex<Bucket>>,
}

impl RateLimits {
    /// A bucket for every token with a rate: its own `requests_per_second`, else `default`.
    /// Tokens without either, and an API without tokens, are not limited.
    pub fn new(auth: &Auth, default: Option<u32>) -> Self {
        let now = Instant::now();
        let buckets = match auth {
            Auth::Open { .. } => HashMap::new(),
            Auth::Tokens(tokens) => tokens
                .iter()
                .filter_map(|t| {
                    let rate = f64::from(t.requests_per_second().or(default)?);
                    let bucket = Bucket {
                        rate,
                        available: rate,
                        last: now,
                    };
                    Some((t.name().to_owned(), Mutex::new(bucket)))
                })
                .collect(),
        };
        Self { buckets }
    }

    /// Admits one request by the token named `token`, or says how long to wait.
    pub fn check(&self, token: &str) -> Result<(), Duration> {
        match self.buckets.get(token) {
            None => Ok(()),
            Some(bucket) => bucket
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .take(Instant::now()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_allows_a_burst_then_the_rate() {
        let start = Instant::now();
        let mut b = Bucket {
            rate: 4.0,
            available: 4.0,
            last: start,
        };
        for _ in 0..4 {
            assert_eq!(b.take(start), Ok(()));
        }
        let wait = b.take(start).expect_err("burst used up");
        assert_eq!(wait, Duration::from_millis(250));
        let later = start + Duration::from_millis(500);
        assert_eq!(b.take(later), Ok(()));
        assert_eq!(b.take(later), Ok(()));
        assert!(b.take(later).is_err());
        // Idle time refills up to the burst, not beyond.
        let much_later = later + Duration::from_secs(60);
        for _ in 0..4 {
            assert_eq!(b.take(much_later), Ok(()));
        }
        assert!(b.take(much_later).is_err());
    }

    #[test]
    fn limits_follow_the_token_settings() {
        assert_eq!(
            RateLimits::new(&Auth::Open { explicit: false }, Some(1)).check("x"),
            Ok(())
        );
        let entry = |name: &str, rate| crate::auth::TokenFileConfig {
            name: name.into(),
            hash: crate::auth::format_hash(&crate::auth::hash_token(name)),
            role: crate::auth::Role::Read,
            prefixes: vec![String::new()],
            requests_per_second: rate,
        };
        let file = crate::auth::AuthFileConfig {
            mode: None,
            tokens: vec![entry("own", Some(2)), entry("other", None)],
        };
        let auth = Auth::resolve(Some(&file), ([127, 0, 0, 1], 7070).into()).expect("auth");
        let unlimited_default = RateLimits::new(&auth, None);
        assert!(unlimited_default.check("own").is_ok());
        assert!(unlimited_default.check("own").is_ok());
        assert!(unlimited_default.check("own").is_err());
        assert!((0..100).all(|_| unlimited_default.check("other").is_ok()));
        let with_default = RateLimits::new(&auth, Some(1));
        assert!(with_default.check("other").is_ok());
        assert!(with_default.check("other").is_err());
        assert!(with_default.check("own").is_ok());
        assert!(with_default.check("own").is_ok());
    }
}
