//! Per-key rate limits: a token bucket in this process ([`LocalLimiter`]), or one limit
//! shared by every replica of the gateway, kept in Redis ([`RedisLimiter`], feature `redis`).
//!
//! Both allow `rate` requests per second per key, sustained, and `burst` at once. The shared
//! one runs GCRA (the generic cell rate algorithm) as a Lua script: one round trip per
//! request, the time taken from the Redis server's clock so replicas with skewed clocks still
//! agree, one key per API key holding its "theoretical arrival time", expiring when idle.
//!
//! **When Redis is unreachable** (refused, reset, or no answer within the call timeout) the
//! request is judged by a local bucket with the same rate, so the gateway keeps serving; with
//! N replicas the key may then get up to N times its rate. Each such decision is counted
//! ([`RedisLimiter::fallbacks`]), and after a failure Redis is left alone for
//! [`RETRY_AFTER_FAILURE`] so an outage adds no timeout to every request.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use keel_core::fasthash::FastMap;

/// The answer for one request.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Verdict {
    /// Within the limit.
    Allowed,
    /// Over it: the next request may come after this long.
    Limited {
        /// Until a request would be allowed again.
        retry_after: Duration,
    },
}

impl Verdict {
    /// `Retry-After` in whole seconds (at least 1), for a limited request.
    pub fn retry_after_secs(&self) -> Option<u64> {
        match self {
            Verdict::Allowed => None,
            Verdict::Limited { retry_after } => {
                let secs = retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0);
                Some(secs.max(1))
            }
        }
    }
}

/// A rate and burst per key.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    /// Requests per second, sustained.
    pub per_second: f64,
    /// Requests at once above the sustained rate (at least 1).
    pub burst: f64,
}

/// A token bucket per key, in this process.
#[derive(Debug)]
pub struct LocalLimiter {
    rate: Rate,
    /// By credential name: a configured key's, or a verified token's subject (never a value
    /// the request chose freely), so the fast hasher serves.
    buckets: Mutex<FastMap<String, Bucket>>,
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl LocalLimiter {
    /// Buckets of `rate`.
    pub fn new(rate: Rate) -> LocalLimiter {
        LocalLimiter {
            rate,
            buckets: Mutex::new(FastMap::default()),
        }
    }

    /// Take a token for `key` at `now`.
    pub fn admit(&self, key: &str, now: Instant) -> Verdict {
        let Rate { per_second, burst } = self.rate;
        let take = |b: &mut Bucket| {
            b.tokens = (b.tokens + now.saturating_duration_since(b.at).as_secs_f64() * per_second)
                .min(burst);
            b.at = now;
            if b.tokens >= 1.0 {
                b.tokens -= 1.0;
                Verdict::Allowed
            } else {
                Verdict::Limited {
                    retry_after: Duration::from_secs_f64((1.0 - b.tokens) / per_second),
                }
            }
        };
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        // Looked up by `&str`: the key's name is copied once, into its new bucket, not on
        // every request.
        if let Some(b) = buckets.get_mut(key) {
            return take(b);
        }
        take(buckets.entry(key.to_string()).or_insert(Bucket {
            tokens: burst,
            at: now,
        }))
    }
}

/// How long Redis is left alone after a call to it failed.
pub const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(1);

#[cfg(feature = "redis")]
pub use shared::RedisLimiter;

#[cfg(feature = "redis")]
mod shared {
    use super::{LocalLimiter, RETRY_AFTER_FAILURE, Rate, Verdict};
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant};

    /// GCRA. KEYS[1]: the key's state; ARGV[1]: the emission interval (µs between requests
    /// at the sustained rate); ARGV[2]: the burst tolerance (µs). Returns {1, 0} when
    /// allowed, {0, µs until allowed} when not. Only allowed requests move the state, so a
    /// client hammering while limited does not push its own limit further out.
    const GCRA: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local new_tat = tat + interval
local allow_at = new_tat - tolerance
if allow_at > now then
  return {0, allow_at - now}
end
redis.call('SET', KEYS[1], new_tat, 'PX', math.ceil((new_tat - now) / 1000) + 1)
return {1, 0}
";

    /// A limit shared through Redis (see the module doc), with a local fallback.
    pub struct RedisLimiter {
        conn: Arc<Conn>,
        script: redis::Script,
        prefix: String,
        interval_us: u64,
        tolerance_us: u64,
        timeout: Duration,
        local: LocalLimiter,
        fallbacks: AtomicU64,
        /// Redis is not tried again before this instant (µs since `epoch`); 0: try.
        skip_until_us: AtomicU64,
        epoch: Instant,
    }

    /// The connection, made (and after a failure, made anew) in the background. A failed or
    /// timed-out call throws the connection away rather than reusing it: on a multiplexed
    /// connection an answer that never came would leave every later answer one behind.
    struct Conn {
        client: redis::Client,
        config: redis::AsyncConnectionConfig,
        live: Mutex<Option<redis::aio::MultiplexedConnection>>,
        connecting: AtomicBool,
    }

    impl Conn {
        fn get(&self) -> Option<redis::aio::MultiplexedConnection> {
            self.live.lock().unwrap_or_else(|p| p.into_inner()).clone()
        }

        /// Drop the connection and make a new one in the background.
        fn broken(self: &Arc<Self>) {
            *self.live.lock().unwrap_or_else(|p| p.into_inner()) = None;
            self.connect();
        }

        fn connect(self: &Arc<Self>) {
            if self.connecting.swap(true, Ordering::AcqRel) {
                return;
            }
            let conn = self.clone();
            tokio::spawn(async move {
                let mut warned = false;
                loop {
                    match conn
                        .client
                        .get_multiplexed_async_connection_with_config(&conn.config)
                        .await
                    {
                        Ok(c) => {
                            *conn.live.lock().unwrap_or_else(|p| p.into_inner()) = Some(c);
                            conn.connecting.store(false, Ordering::Release);
                            return;
                        }
                        Err(e) if !warned => {
                            warned = true;
                            tracing::warn!(error = %e, "rate limit: Redis unreachable; limiting locally until it is");
                        }
                        Err(e) => {
                            tracing::debug!(error = %e, "rate limit: Redis still unreachable")
                        }
                    }
                    tokio::time::sleep(RETRY_AFTER_FAILURE).await;
                }
            });
        }
    }

    impl std::fmt::Debug for RedisLimiter {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("RedisLimiter")
                .field("prefix", &self.prefix)
                .field("state", &self.state())
                .field("fallbacks", &self.fallbacks())
                .finish_non_exhaustive()
        }
    }

    impl RedisLimiter {
        /// A limiter of `rate` per key at `url` (`redis://host:port/db`), its keys named
        /// `prefix` + the API key's name, each call given `timeout`. The connection is made
        /// in the background (retried every second until it succeeds), so a gateway starts
        /// while Redis is down; until then the local fallback decides. Must be called on a
        /// Tokio runtime. A malformed `url` is an error.
        pub fn start(
            url: &str,
            prefix: &str,
            rate: Rate,
            timeout: Duration,
        ) -> Result<RedisLimiter, String> {
            let client =
                redis::Client::open(url).map_err(|e| format!("rate limit Redis {url:?}: {e}"))?;
            let config = redis::AsyncConnectionConfig::new()
                .set_connection_timeout(Some(timeout.max(Duration::from_millis(100))))
                .set_response_timeout(Some(timeout));
            let conn = Arc::new(Conn {
                client,
                config,
                live: Mutex::new(None),
                connecting: AtomicBool::new(false),
            });
            conn.connect();
            let per_second = rate.per_second.max(f64::MIN_POSITIVE);
            let interval_us = (1e6 / per_second).max(1.0);
            Ok(RedisLimiter {
                conn,
                script: redis::Script::new(GCRA),
                prefix: prefix.to_string(),
                interval_us: interval_us as u64,
                tolerance_us: (interval_us * rate.burst.max(1.0)) as u64,
                timeout,
                local: LocalLimiter::new(rate),
                fallbacks: AtomicU64::new(0),
                skip_until_us: AtomicU64::new(0),
                epoch: Instant::now(),
            })
        }

        /// Decisions the local fallback took because Redis could not be asked.
        pub fn fallbacks(&self) -> u64 {
            self.fallbacks.load(Ordering::Relaxed)
        }

        /// Whether a connection to Redis is up.
        pub fn connected(&self) -> bool {
            self.conn.get().is_some()
        }

        /// Who decides right now: `"redis"`, `"local: paused"` (a call failed less than
        /// [`RETRY_AFTER_FAILURE`] ago) or `"local: connecting"` (no connection up).
        pub fn state(&self) -> &'static str {
            if self.micros_now() < self.skip_until_us.load(Ordering::Relaxed) {
                "local: paused"
            } else if !self.connected() {
                "local: connecting"
            } else {
                "redis"
            }
        }

        fn micros_now(&self) -> u64 {
            u64::try_from(self.epoch.elapsed().as_micros()).unwrap_or(u64::MAX)
        }

        /// Judge one request of `key`.
        pub async fn admit(&self, key: &str) -> Verdict {
            let now = Instant::now();
            let now_us = self.micros_now();
            if now_us >= self.skip_until_us.load(Ordering::Relaxed)
                && let Some(mut conn) = self.conn.get()
            {
                let mut call = self.script.key(format!("{}{key}", self.prefix));
                call.arg(self.interval_us).arg(self.tolerance_us);
                let answer =
                    tokio::time::timeout(self.timeout, call.invoke_async::<(i64, i64)>(&mut conn))
                        .await;
                match answer {
                    Ok(Ok((1, _))) => return Verdict::Allowed,
                    Ok(Ok((_, wait_us))) => {
                        return Verdict::Limited {
                            retry_after: Duration::from_micros(u64::try_from(wait_us).unwrap_or(0)),
                        };
                    }
                    Ok(Err(e)) => {
                        tracing::warn!(error = %e, "rate limit: Redis call failed; limiting locally for a second")
                    }
                    Err(_) => {
                        tracing::warn!(timeout = ?self.timeout, "rate limit: Redis did not answer in time; limiting locally for a second")
                    }
                }
                self.conn.broken();
                let skip = u64::try_from(RETRY_AFTER_FAILURE.as_micros()).unwrap_or(u64::MAX);
                self.skip_until_us
                    .store(now_us.saturating_add(skip), Ordering::Relaxed);
            }
            self.fallbacks.fetch_add(1, Ordering::Relaxed);
            self.local.admit(key, now)
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_local_bucket_allows_its_burst_then_its_rate() {
        let l = LocalLimiter::new(Rate {
            per_second: 10.0,
            burst: 3.0,
        });
        let t0 = Instant::now();
        for _ in 0..3 {
            assert_eq!(l.admit("k", t0), Verdict::Allowed);
        }
        let limited = l.admit("k", t0);
        assert_eq!(limited.retry_after_secs(), Some(1));
        let Verdict::Limited { retry_after } = limited else {
            panic!("{limited:?}");
        };
        assert!(retry_after <= Duration::from_millis(100), "{retry_after:?}");
        // Another key has its own bucket; 100 ms later one token is back.
        assert_eq!(l.admit("other", t0), Verdict::Allowed);
        assert_eq!(
            l.admit("k", t0 + Duration::from_millis(100)),
            Verdict::Allowed
        );
        assert!(matches!(
            l.admit("k", t0 + Duration::from_millis(100)),
            Verdict::Limited { .. }
        ));
    }
}
