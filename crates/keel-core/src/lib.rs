//! Keel's core: the small types every other Keel crate shares.
//!
//! - [`BoxError`], the one boxed error type at crate boundaries, and [`is_caused_by`] for
//!   inspecting a chain by downcasting (leaf errors stay typed near the code that raises them).
//! - [`shutdown`], the process lifecycle signal: the phases a graceful drain walks through and the
//!   hooks (deregistration, consumer stop) that run on the way.
//! - [`context`]: the request [`Context`] — absolute deadline, request id, trace identity,
//!   baggage, retry marker, and the [`tasks::TaskScope`] its spawned tasks belong to.
//! - [`codec`]: parsers and encoders for `grpc-timeout`, W3C `traceparent`/`tracestate`/`baggage`,
//!   B3 and request ids.
//! - [`propagation`]: writing a context into the next hop's headers (HTTP, gRPC, messages).
//! - [`tasks`]: the task registry behind `/debug/tasks` and leak detection.
//! - [`grpc`]: is-gRPC, status codes, `grpc-status` parsing and `grpc-message` encoding.
//! - [`observe`]: the records the server, client and consumers hand to an App's observer.
//!
//! Nothing in this crate knows about servers, brokers or databases; `http` is used only as
//! the header-map type.

#[cfg(feature = "axum")]
mod axum;
pub mod codec;
pub mod context;
pub mod fasthash;
pub mod grpc;
mod header_value;
pub mod headers;
pub mod observe;
pub mod propagation;
pub mod shutdown;
pub mod tasks;

#[cfg(feature = "axum")]
pub use axum::MissingContext;
pub use context::Context;
pub use shutdown::{Held, Phase, Shutdown, ShutdownHook};

/// The boxed error used at crate boundaries, compatible with hyper, tower and tonic.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// True if `err` or any error in its `source()` chain is an `E`.
pub fn is_caused_by<E: std::error::Error + 'static>(
    err: &(dyn std::error::Error + 'static),
) -> bool {
    let mut cur = Some(err);
    while let Some(e) = cur {
        if e.is::<E>() {
            return true;
        }
        cur = e.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Leaf;
    impl std::fmt::Display for Leaf {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("leaf")
        }
    }
    impl std::error::Error for Leaf {}

    #[derive(Debug)]
    struct Wrap(Leaf);
    impl std::fmt::Display for Wrap {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("wrap")
        }
    }
    impl std::error::Error for Wrap {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }

    #[test]
    fn finds_a_cause_deep_in_the_chain_and_not_a_stranger() {
        let e: BoxError = Box::new(Wrap(Leaf));
        assert!(is_caused_by::<Leaf>(e.as_ref()));
        assert!(is_caused_by::<Wrap>(e.as_ref()));
        assert!(!is_caused_by::<std::io::Error>(e.as_ref()));
    }
}
