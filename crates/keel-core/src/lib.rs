//! Keel's core: the small types every other Keel crate shares.
//!
//! - [`BoxError`], the one boxed error type at crate boundaries, and [`is_caused_by`] for
//!   inspecting a chain by downcasting (leaf errors stay typed near the code that raises them).
//! - [`shutdown`], the process lifecycle signal: the phases a graceful drain walks through and the
//!   hooks (deregistration, consumer stop) that run on the way.
//!
//! The request `Context`, deadlines and header codecs land here next; nothing in this crate
//! knows about HTTP servers, brokers or databases.

pub mod shutdown;

pub use shutdown::{Phase, Shutdown, ShutdownHook};

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
