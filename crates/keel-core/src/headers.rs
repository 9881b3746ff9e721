//! HTTP header names that more than one Keel crate uses and that `http` has no constant for,
//! made once: a map looked up by a `&str` parses and checks the name on every lookup. Keel's
//! own propagation headers are in [`crate::propagation::names`], gRPC's in [`crate::grpc`].

use http::HeaderName;

/// `Keep-Alive`: the server advertises its idle timeout in it (`timeout=N`), and Keel's
/// client reads it to expire pooled connections first.
pub static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
