//! The shared rate limit against the machine's real Redis (127.0.0.1:6379): two replicas
//! hold one limit between them, and with Redis out of reach each falls back to its own
//! bucket, counted, then goes back to Redis once it answers again. Keys carry a per-run
//! prefix, so runs and other users of the server do not meet.
#![cfg(feature = "redis")]
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use keel_gateway::ratelimit::{RETRY_AFTER_FAILURE, Rate, RedisLimiter, Verdict};
use keel_test_support::fault::{Fault, FaultProxy};

const REDIS: &str = "127.0.0.1:6379";

/// A burst of 10 and a refill so slow (one per 100 s) that none arrives during a test: the
/// counts below are exact, whatever the machine's speed.
const RATE: Rate = Rate {
    per_second: 0.01,
    burst: 10.0,
};

fn prefix(test: &str) -> String {
    format!(
        "keel-test:{test}:{}:{:x}:",
        std::process::id(),
        keel_core::codec::rand::next_u64()
    )
}

async fn connected(l: &RedisLimiter) {
    for _ in 0..200 {
        if l.connected() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("no connection to Redis at {REDIS}");
}

async fn allowed(l: &RedisLimiter, key: &str, n: usize) -> usize {
    let mut ok = 0;
    for _ in 0..n {
        if l.admit(key).await == Verdict::Allowed {
            ok += 1;
        }
    }
    ok
}

#[tokio::test]
async fn two_replicas_share_one_limit() {
    let p = prefix("shared");
    let url = format!("redis://{REDIS}/");
    let a = RedisLimiter::start(&url, &p, RATE, Duration::from_millis(500)).unwrap();
    let b = RedisLimiter::start(&url, &p, RATE, Duration::from_millis(500)).unwrap();
    connected(&a).await;
    connected(&b).await;
    // Alternating between the replicas, 30 requests of one key: the burst of 10 is the whole
    // allowance (two local buckets would have allowed 20).
    let mut ok = 0;
    for _ in 0..15 {
        ok += allowed(&a, "k1", 1).await;
        ok += allowed(&b, "k1", 1).await;
    }
    assert_eq!(ok, 10);
    // Limited answers say when to come back: the next token is 100 s away.
    let Verdict::Limited { retry_after } = a.admit("k1").await else {
        panic!("an 11th request was allowed");
    };
    assert!(retry_after > Duration::from_secs(60), "{retry_after:?}");
    // Another key has an allowance of its own.
    assert_eq!(allowed(&b, "k2", 12).await, 10);
    assert_eq!(a.fallbacks() + b.fallbacks(), 0);
}

#[tokio::test]
async fn without_redis_each_replica_limits_alone_counts_it_and_comes_back() {
    let proxy = FaultProxy::start(REDIS.parse().unwrap()).await.unwrap();
    let url = format!("redis://{}/", proxy.addr());
    let p = prefix("fallback");
    let l = RedisLimiter::start(&url, &p, RATE, Duration::from_millis(200)).unwrap();
    connected(&l).await;
    assert_eq!(allowed(&l, "k", 4).await, 4);
    assert_eq!(l.fallbacks(), 0);

    // Redis stops answering: the first call waits out its timeout, then the local bucket
    // decides — and keeps deciding, without asking Redis, for a second.
    assert_eq!(l.state(), "redis");
    proxy.set(Fault::Blackhole);
    assert_eq!(allowed(&l, "k", 1).await, 1);
    assert_eq!(l.state(), "local: paused", "one timeout pauses Redis");
    assert_eq!(
        allowed(&l, "k", 11).await,
        9,
        "the local bucket's own burst of 10"
    );
    assert_eq!(l.fallbacks(), 12);

    // Redis answers again: after the pause it is asked again, and remembers the 4 it allowed.
    proxy.set(Fault::None);
    tokio::time::sleep(RETRY_AFTER_FAILURE + Duration::from_millis(100)).await;
    let mut back = false;
    for _ in 0..50 {
        let before = l.fallbacks();
        let verdict = l.admit("k").await;
        if l.fallbacks() == before {
            back = true;
            assert_eq!(verdict, Verdict::Allowed, "the 5th of Redis's 10");
            break;
        }
        // The old connection died with the black hole; the manager reconnects.
        tokio::time::sleep(RETRY_AFTER_FAILURE).await;
    }
    assert!(back, "the limiter never went back to Redis");
    assert_eq!(
        allowed(&l, "k", 10).await,
        5,
        "Redis's allowance, shared since the start"
    );
}
