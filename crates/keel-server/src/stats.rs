//! Counters the server keeps about itself, shared by its connections and layers.

use std::sync::atomic::{AtomicU64, AtomicUsize};

/// Counters the server keeps about itself (exported as metrics by the telemetry issue).
#[derive(Debug, Default)]
pub struct Stats {
    /// Requests currently being handled, across all connections.
    pub in_flight: AtomicUsize,
    /// Connections currently open.
    pub connections: AtomicUsize,
    /// Open connections that are parked: idle, holding no HTTP/1 buffers
    /// (`server.park_idle_after`).
    pub parked: AtomicUsize,
    /// Connections accepted since start.
    pub accepted: AtomicU64,
    /// Connections closed because a request head did not arrive within `header_read_timeout`.
    pub header_timeouts: AtomicU64,
    /// Connections closed because their peer took no byte of a response for `send_timeout`.
    pub send_timeouts: AtomicU64,
    /// Requests refused with 413 before reaching the handler.
    pub body_too_large: AtomicU64,
    /// Requests refused on arrival: malformed propagation headers (400) or an already
    /// expired deadline (504).
    pub refused_on_arrival: AtomicU64,
    /// Handlers cancelled because their deadline passed (answered 504).
    pub deadline_exceeded: AtomicU64,
}
